"""The fused update step on tiny models: micro-batching is exact, float32 / bfloat16 paths,
the non-finite guard, every preset (loss finite, params change, the objective goes down),
OPD lowers the KL to the teacher, reward alone teaches a bandit (DGPO, PPO, GRPO), DGPO
leaves correct samples untouched by the KL, sharding, bad input caught before compiling, and
the step compiled ahead of time from abstract arguments."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgpo_jax.learner.batches import (
    TOP_MULTIPLE,
    RowGrouper,
    best_row_groups,
    fit_width,
    length_groups,
    right_align,
    trim_to_bucket,
    width_buckets,
)
from dgpo_jax.learner.optim import OptimConfig
from dgpo_jax.learner.packing import pack_width, trajectory_lengths
from dgpo_jax.learner.update_step import (
    abstract_update_state,
    create_update_state,
    make_update_step,
)
from dgpo_jax.models import forward, get_preset, param_shapes, save_hf
from dgpo_jax.objectives import get_objective
from dgpo_jax.objectives.batch import batch_requirements
from dgpo_jax.parallel.sharding import plan_from_config
from tests.conftest import random_params
from tests.test_reference_ports import (
    ref_dgpo_token_level_rewards,
    ref_gae_recursion,
    ref_masked_whiten,
)

V, B, T, PROMPT = 48, 4, 10, 3
# Tiny programs: spend less time in XLA's CPU optimiser (numerics are unchanged).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def models():
    sc = get_preset("tiny", vocab_size=V, num_hidden_layers=1, tie_word_embeddings=False)
    tc = get_preset("tiny-teacher", vocab_size=V, num_hidden_layers=1, tie_word_embeddings=False)
    sp, tp = random_params(sc, 0), random_params(tc, 1)
    # sharper distributions than the 0.02 init (logit std ~1.5), so the models disagree visibly
    sp = dict(sp, lm_head=sp["lm_head"] * 10)
    tp = dict(tp, lm_head=tp["lm_head"] * 10)
    return sc, sp, tc, tp


def token_logprobs(config, params, ids, am):
    lp = jax.nn.log_softmax(forward(config, params, jnp.asarray(ids), jnp.asarray(am)), -1)
    out = np.zeros(ids.shape, np.float32)
    out[:, 1:] = np.take_along_axis(np.asarray(lp)[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return out


def make_batch(models, seed=0, ids=None):
    """Student-sampled-looking rollouts: prompt, response with an observation hole, padding."""
    sc, sp, tc, tp = models
    r = np.random.default_rng(seed)
    if ids is None:
        ids = r.integers(0, V, (B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    am[1, -2:] = 0
    lm = np.zeros((B, T), np.float32)
    lm[:, PROMPT:] = 1
    lm[:, 6:8] = 0  # an observation
    lm *= am
    tmask = np.zeros((B, T), np.float32)
    tmask[2, 6:8] = 1  # a teacher turn
    old = token_logprobs(sc, sp, ids, am)
    return dict(
        input_ids=ids,
        attention_mask=am,
        loss_mask=lm,
        old_logprobs=old,
        rewards=np.array([1.0, 0.0, 0.0, 1.0], np.float32),
        teacher_logprobs=token_logprobs(tc, tp, ids, am),
        ref_logprobs=old + r.normal(0, 0.3, old.shape).astype(np.float32),
        group_ids=np.array([0, 0, 1, 1], np.int32),
        teacher_mask=tmask,
        values=r.normal(0, 0.5, (B, T)).astype(np.float32),
        sampler_logprobs=old.copy(),
        taid_t=np.float32(0.5),
    )


def select(batch, cfg, teacher_in_program, drop=()):
    req, opt = batch_requirements(cfg, teacher_in_program)
    return {k: v for k, v in batch.items() if (k in req or k in opt) and k not in drop}


_PRESET_OVERRIDES = {
    "guided_opd": {"teacher_turn_loss": "fkl"},
    "ppo": {"critic": "value_head"},
    "dgpo": {"critic": "value_head", "beta": 0.5},
}
_STEPS = {}
_SMALL_STEPS = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05))


def preset_step(models, name):
    """(config, compiled-once update step, teacher in program?) shared by the tests below."""
    if name not in _STEPS:
        sc, _, tc, _ = models
        cfg = get_objective(name, **_PRESET_OVERRIDES.get(name, {}))
        in_program = cfg.needs_teacher_logits
        _STEPS[name] = (
            cfg,
            make_update_step(
                cfg, sc, tc if in_program else None, optimizer=_SMALL_STEPS, compiler_options=FAST
            ),
            in_program,
        )
    return _STEPS[name]


def copy_params(p):
    return jax.tree.map(jnp.copy, p)


def max_abs_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ------------------------------------------------------------------------------------------
def torch_dgpo_loss(tmp_path, models, head, batch, beta):
    """First-step DGPO loss from the plain PyTorch implementation in benchmarks/update_step.py
    (transformers student / teacher / critic loaded from the same weights)."""
    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
    import transformers  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "update_step.py")
    spec = importlib.util.spec_from_file_location("bench_update_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sc, sp, tc, tp = models
    save_hf(sc, jax.device_get(sp), str(tmp_path / "s"))
    save_hf(tc, jax.device_get(tp), str(tmp_path / "t"))
    student = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "s"))
    teacher = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "t")).eval()
    critic = transformers.Qwen2Model.from_pretrained(str(tmp_path / "s"))
    value_head = torch.nn.Linear(sc.hidden_size, 1)
    with torch.no_grad():
        value_head.weight.copy_(torch.from_numpy(np.array(head["kernel"], np.float32))[None])
        value_head.bias.fill_(float(head["bias"]))
    opt = torch.optim.SGD(list(student.parameters()) + list(critic.parameters()), lr=0.0)
    run = bench.torch_step_fn(student, teacher, critic, value_head, opt, opt, batch, beta=beta)
    return run()


def test_micro_batched_step_equals_full_batch_and_keeps_sharding(models, tmp_path):
    """DGPO with the teacher forward in the program (pre-pass for GAE), a separate critic and
    whitening: 1 vs 2 micro-batches (the second sharded over a 2x4 mesh) give the same update,
    and the loss equals a plain PyTorch implementation's on the same weights."""
    sc, sp, tc, tp = models
    cfg = get_objective("dgpo", beta=0.05)
    batch = select(make_batch(models), cfg, True, drop=("values",))
    tx = optax.sgd(0.1)
    outs = {}
    for m in (1, 2):
        plan = plan_from_config({"data": 2, "fsdp": -1}) if m == 2 else None
        step = make_update_step(
            cfg, sc, tc, optimizer=tx, micro_batches=m, plan=plan, compiler_options=FAST
        )
        params = copy_params(sp) if plan is None else plan.shard_params(sc, copy_params(sp))
        state = create_update_state(cfg, params, tx, 0)
        head = jax.device_get(state.params["critic"]["value_head"])
        in_shardings = jax.tree.map(lambda x: x.sharding, state.params["policy"])
        state, metrics = step(state, batch, tp)
        outs[m] = (jax.device_get(state.params), jax.device_get(metrics))
        if plan is not None:
            out_shardings = jax.tree.map(lambda x: x.sharding, state.params["policy"])
            assert jax.tree.all(jax.tree.map(lambda a, b: a == b, in_shardings, out_shardings))
    (p1, m1), (p2, m2) = outs[1], outs[2]
    assert float(m1["skipped"]) == 0 and np.isfinite(float(m1["loss"]))
    for k in (
        "loss",
        "policy_loss",
        "value_loss",
        "grad_norm",
        "entropy",
        "kl_k3",
        "explained_variance",
        "clip_frac",
        "gate_share",
    ):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=2e-4, atol=1e-6, err_msg=k)
    assert float(m1["gate_share"]) == 0.5
    assert max_abs_diff(p1, p2) < 1e-5
    np.testing.assert_allclose(
        float(m1["loss"]), torch_dgpo_loss(tmp_path, models, head, batch, beta=0.05), rtol=1e-4
    )
    assert max_abs_diff(p1["policy"], sp) > 1e-4  # it did update
    assert max_abs_diff(p1["critic"]["trunk"], sp) > 1e-4  # the critic trains separately


def test_float32_and_bfloat16_paths(models):
    sc, sp, tc, tp = models
    cfg, step, _ = preset_step(models, "kd")
    batch = select(make_batch(models), cfg, True)
    res = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        cast = lambda p: jax.tree.map(lambda x: x.astype(dtype), p)
        state = create_update_state(cfg, cast(copy_params(sp)), step.tx, 0)
        new, metrics = step(state, batch, cast(tp))
        assert jax.tree.leaves(new.params)[0].dtype == dtype
        assert max_abs_diff(new.params["policy"], cast(sp)) > 0
        res[dtype] = (
            float(metrics["loss"]),
            float(metrics["grad_norm"]),
            float(metrics["kl_k3"]),
            float(metrics["skipped"]),
        )
    f, h = res[jnp.float32], res[jnp.bfloat16]
    assert f[3] == 0 and h[3] == 0 and np.isfinite(h[0])
    np.testing.assert_allclose(h[:3], f[:3], rtol=0.08, atol=1e-3)


def test_nonfinite_gradients_skip_the_step(models):
    sc, sp, tc, tp = models
    cfg, step, _ = preset_step(models, "opd")
    good = select(make_batch(models), cfg, True)
    bad = dict(good, old_logprobs=good["old_logprobs"].copy())
    bad["old_logprobs"][0, PROMPT] = np.nan
    state = create_update_state(cfg, copy_params(sp), step.tx, 0)
    before = jax.device_get((state.train.params, state.train.opt_state))
    state, metrics = step(state, bad, tp)
    assert float(metrics["skipped"]) == 1 and int(state.skipped_steps) == 1
    assert int(state.step) == 0
    after = jax.device_get((state.train.params, state.train.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, good, tp)
    assert float(metrics["skipped"]) == 0 and int(state.skipped_steps) == 1
    assert int(state.step) == 1
    assert max_abs_diff(state.params["policy"], sp) > 0


@pytest.mark.parametrize(
    "name",
    [
        "ppo",
        "grpo",
        "dgpo",
        "dgpo_coldstart",
        "opd",
        "exopd",
        "tropd",
        "guided_opd",
        "kd",
        "seqkd",
        "gkd",
        "distillm",
        "taid",
    ],
)
def test_each_preset_moves_its_objective_down(models, name):
    """One small SGD step on a tiny model: loss finite, params change, and the same batch's
    loss is lower afterwards (first-order descent of the objective; on-policy old log-probs)."""
    sc, sp, tc, tp = models
    cfg, step, in_program = preset_step(models, name)
    batch = select(make_batch(models, seed=3), cfg, in_program)
    state = create_update_state(cfg, copy_params(sp), step.tx, 0)
    args = (tp,) if in_program else ()
    state, m1 = step(state, batch, *args)
    state, m2 = step(state, batch, *args)
    assert np.isfinite(float(m1["loss"])) and float(m1["skipped"]) == 0
    assert float(m1["grad_norm"]) > 0
    assert max_abs_diff(state.params["policy"], sp) > 0
    assert float(m2["loss"]) < float(m1["loss"]), (name, float(m1["loss"]), float(m2["loss"]))


def test_opd_lowers_kl_to_teacher(models):
    """On-policy distillation with fresh student samples each step lowers the exact
    full-vocabulary KL(student || teacher) on a fixed evaluation set."""
    sc, sp, tc, tp = models
    cfg = get_objective("opd")
    step = make_update_step(
        cfg,
        sc,
        tc,
        compiler_options=FAST,
        optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5)),
    )
    n = 64  # rollouts per step

    @jax.jit
    def sample(params, key):
        ids = jax.random.randint(jax.random.fold_in(key, 99), (n, T), 0, V)

        def body(t, ids):
            logits = forward(sc, params, ids)[:, t - 1]
            return ids.at[:, t].set(jax.random.categorical(jax.random.fold_in(key, t), logits))

        return jax.lax.fori_loop(PROMPT, T, body, ids)

    @jax.jit
    def exact_kl(params, ids):
        ls = jax.nn.log_softmax(forward(sc, params, ids), -1)[:, PROMPT - 1 : -1]
        lt = jax.nn.log_softmax(forward(tc, tp, ids), -1)[:, PROMPT - 1 : -1]
        return jnp.mean(jnp.sum(jnp.exp(ls) * (ls - lt), -1))

    eval_ids = sample(sp, jax.random.key(1000))
    state = create_update_state(cfg, copy_params(sp), step.tx, 0)
    kl0 = float(exact_kl(state.params["policy"], eval_ids))
    loss_mask = np.zeros((n, T), np.float32)
    loss_mask[:, PROMPT:] = 1
    for i in range(16):
        ids = np.asarray(sample(state.params["policy"], jax.random.key(i)))
        batch = dict(
            input_ids=ids,
            attention_mask=np.ones((n, T), np.int32),
            loss_mask=loss_mask,
            old_logprobs=token_logprobs(sc, state.params["policy"], ids, np.ones((n, T))),
        )
        state, metrics = step(state, batch, tp)
        assert float(metrics["clip_frac"]) < 0.5
    kl1 = float(exact_kl(state.params["policy"], eval_ids))
    print("KL(S||T) before/after", kl0, kl1)
    assert kl1 < 0.8 * kl0, (kl0, kl1)


def test_dgpo_leaves_correct_samples_untouched_by_the_kl(models):
    """Changing the teacher's log-probs on a correct trajectory (R = 1) changes nothing in the
    update; changing them on a wrong one does."""
    sc, sp, tc, tp = models
    cfg, step, _ = preset_step(models, "dgpo")  # beta 0.5, value head
    base = select(make_batch(models), cfg, False)
    r = np.random.default_rng(5)

    def run(batch):
        state = create_update_state(cfg, copy_params(sp), step.tx, 0)
        state, metrics = step(state, batch, None)
        return jax.device_get(state.params), jax.device_get(metrics)

    p0, m0 = run(base)
    correct = dict(base, teacher_logprobs=base["teacher_logprobs"].copy())
    correct["teacher_logprobs"][0] += r.normal(0, 3, T).astype(np.float32)  # rewards[0] = 1
    p1, m1 = run(correct)
    wrong = dict(base, teacher_logprobs=base["teacher_logprobs"].copy())
    wrong["teacher_logprobs"][1] += r.normal(0, 3, T).astype(np.float32)  # rewards[1] = 0
    p2, m2 = run(wrong)
    assert max_abs_diff(p0, p1) == 0.0
    assert float(m0["loss"]) == float(m1["loss"])
    assert max_abs_diff(p0, p2) > 1e-6


def test_bad_input_is_caught_before_compiling(models):
    sc, sp, tc, tp = models
    cfg = get_objective("dgpo")
    step = make_update_step(cfg, sc, None)
    batch = select(make_batch(models), cfg, False)
    cases = [
        (
            {k: v for k, v in batch.items() if k != "teacher_logprobs"},
            r"needs batch field\(s\) \['teacher_logprobs'\].*teacher_config",
        ),
        (
            {k: v for k, v in batch.items() if k not in ("rewards", "old_logprobs")},
            r"needs batch field\(s\) \['old_logprobs', 'rewards'\]",
        ),
        (dict(batch, reward=batch["rewards"]), r"unknown field\(s\) \['reward'\]"),
        (
            dict(batch, loss_mask=batch["loss_mask"][:, :-1]),
            r"batch\['loss_mask'\] has shape \(4, 9\), expected \(4, 10\)",
        ),
        (
            dict(batch, rewards=batch["rewards"][:, None]),
            r"batch\['rewards'\] has shape \(4, 1\), expected \(4,\)",
        ),
        (dict(batch, input_ids=batch["input_ids"].astype(np.float32)), "must be an integer array"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            step(None, bad)
    assert step._jitted is None  # nothing was compiled
    grpo = get_objective("grpo")
    with pytest.raises(ValueError, match=r"\['group_ids'\]"):
        make_update_step(grpo, sc)(
            None, {k: v for k, v in make_batch(models).items() if k != "group_ids"}
        )
    with pytest.raises(ValueError, match="needs full-vocabulary teacher logits"):
        make_update_step(get_objective("kd"), sc)
    with pytest.raises(ValueError, match="pass teacher_params"):
        make_update_step(get_objective("kd"), sc, tc)(
            None, select(batch, get_objective("kd"), True)
        )
    with pytest.raises(ValueError, match="not divisible by micro_batches=3"):
        make_update_step(cfg, sc, micro_batches=3)(None, batch)
    with pytest.raises(ValueError, match="advantage='gae' needs a critic"):
        get_objective("dgpo", critic="none")


def test_separate_critic_learning_rate(models):
    """AdamW groups: policy lr 0 leaves the student untouched while the value head trains."""

    sc, sp, tc, tp = models
    cfg, _, _ = preset_step(models, "ppo")  # value head on the student trunk
    step = make_update_step(
        cfg,
        sc,
        optimizer=OptimConfig(lr=0.0, critic_lr=1e-2, schedule="constant"),
        compiler_options=FAST,
    )
    state = create_update_state(cfg, copy_params(sp), step.tx, 0)
    head = jax.device_get(state.params["value_head"])
    state, metrics = step(state, select(make_batch(models), cfg, False))
    assert float(metrics["grad_norm_policy"]) > 0 and float(metrics["grad_norm_critic"]) > 0
    assert max_abs_diff(state.params["policy"], sp) == 0.0
    assert max_abs_diff(state.params["value_head"], head) > 1e-3


@pytest.mark.parametrize("name", ["dgpo", "ppo", "grpo"])
def test_reward_alone_teaches_the_rewarded_token(models, name):
    """A one-token bandit through the whole update (rewards -> advantages -> PPO-clip): the
    reward is 1 when the first response token is TARGET. With fresh on-policy samples each step,
    the student's probability of TARGET rises well above where it started, for the critic
    presets (GAE, value head) and for GRPO's group baseline alike."""
    sc, sp, tc, tp = models
    cfg = get_objective(name, **_PRESET_OVERRIDES.get(name, {}))
    step = make_update_step(
        cfg,
        sc,
        None,
        compiler_options=FAST,
        optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3)),
    )
    n, target, resp = 64, 7, PROMPT + 2  # rows, rewarded token, sequence length
    prompts = np.asarray(jax.random.randint(jax.random.key(5), (n // 4, PROMPT), 0, V))
    prompts = np.repeat(prompts, 4, axis=0)  # 4 rollouts per prompt (the GRPO groups)
    blank = jnp.concatenate([jnp.asarray(prompts), jnp.zeros((n, 2), jnp.int32)], 1)

    @jax.jit
    def sample(params, key):
        ids = blank
        for t in range(PROMPT, resp):
            logits = forward(sc, params, ids)[:, t - 1]
            ids = ids.at[:, t].set(jax.random.categorical(jax.random.fold_in(key, t), logits))
        return ids

    def p_target(params):
        probs = jax.nn.softmax(forward(sc, params, blank)[:, PROMPT - 1], -1)
        return float(jnp.mean(probs[:, target]))

    state = create_update_state(cfg, copy_params(sp), step.tx, 0)
    p0 = p_target(state.params["policy"])
    am, lm = np.ones((n, resp), np.int32), np.zeros((n, resp), np.float32)
    lm[:, PROMPT:] = 1
    for i in range(25):
        policy = state.params["policy"]
        ids = np.asarray(sample(policy, jax.random.key(i)))
        old = token_logprobs(sc, policy, ids, am)
        batch = dict(
            input_ids=ids,
            attention_mask=am,
            loss_mask=lm,
            old_logprobs=old,
            rewards=(ids[:, PROMPT] == target).astype(np.float32),
            group_ids=np.repeat(np.arange(n // 4), 4).astype(np.int32),
            teacher_logprobs=token_logprobs(tc, tp, ids, am),
            ref_logprobs=old,
        )
        state, metrics = step(state, select(batch, cfg, False))
        assert np.isfinite(float(metrics["loss"]))
    p1 = p_target(state.params["policy"])
    print(name, "p(target) before/after", p0, p1)
    assert p0 < 0.2 and p1 > max(3 * p0, 0.3), (p0, p1)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_dgpo_divergence_placement_is_the_gated_full_vocabulary_kl(models, direction):
    """``dgpo(kl_placement="divergence")``: the divergence term is the exact full-vocabulary KL
    (teacher first for "forward") averaged over every student token, counted only on the wrong
    trajectories; NumPy on the two models' full logits is the reference."""
    sc, sp, tc, tp = models
    cfg = get_objective(
        "dgpo", kl_placement="divergence", kl_direction=direction, beta=0.5, critic="value_head"
    )
    step = make_update_step(cfg, sc, tc, optimizer=optax.sgd(0.0), compiler_options=FAST)
    batch = select(make_batch(models, seed=4), cfg, True)
    state = create_update_state(cfg, copy_params(sp), step.tx, 0)
    _, m = step(state, batch, tp)

    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    ls = np.asarray(jax.nn.log_softmax(forward(sc, sp, jnp.asarray(ids), jnp.asarray(am)), -1))
    lt = np.asarray(jax.nn.log_softmax(forward(tc, tp, jnp.asarray(ids), jnp.asarray(am)), -1))
    p, q = (lt, ls) if direction == "forward" else (ls, lt)
    kl = np.zeros(ids.shape)
    kl[:, 1:] = np.sum(np.exp(p[:, :-1]) * (p[:, :-1] - q[:, :-1]), -1)  # predicts token t
    wrong = (batch["rewards"] < 0.1).astype(np.float64)[:, None]
    expected = np.sum(kl * lm * wrong) / np.sum(lm)
    ungated = np.sum(kl * lm) / np.sum(lm)
    assert abs(expected - ungated) > 0.05  # the gate matters on this batch
    np.testing.assert_allclose(float(m["divergence"]), expected, rtol=1e-4)


def test_loss_without_update_is_the_skew_kl_and_the_steps_loss(models):
    """``UpdateStep.loss`` (DistiLLM's validation loss): for distillm it is the skew KL
    KL(T || a T + (1-a) S) over the student tokens (NumPy on both models' logits), equal to the
    step's own ``loss`` metric on the same batch, with one micro-batch or two, and it leaves the
    parameters alone."""
    sc, sp, tc, tp = models
    cfg = get_objective("distillm")
    batch = select(make_batch(models, seed=5), cfg, True)
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    ls = np.asarray(
        jax.nn.log_softmax(forward(sc, sp, jnp.asarray(ids), jnp.asarray(am)), -1), np.float64
    )
    lt = np.asarray(
        jax.nn.log_softmax(forward(tc, tp, jnp.asarray(ids), jnp.asarray(am)), -1), np.float64
    )
    a = cfg.skew_alpha
    pt, mix = np.exp(lt), a * np.exp(lt) + (1 - a) * np.exp(ls)
    skl = np.zeros(ids.shape)
    skl[:, 1:] = np.sum(pt[:, :-1] * (lt[:, :-1] - np.log(mix[:, :-1])), -1)
    expected = np.sum(skl * lm) / np.sum(lm)
    for m in (1, 2):
        step = make_update_step(
            cfg, sc, tc, optimizer=optax.sgd(0.1), micro_batches=m, compiler_options=FAST
        )
        state = create_update_state(cfg, copy_params(sp), step.tx, 0)
        out = step.loss(state, batch, tp)
        np.testing.assert_allclose(float(out["loss"]), expected, rtol=1e-4)
        np.testing.assert_allclose(float(out["divergence"]), expected, rtol=1e-4)
        assert max_abs_diff(state.params["policy"], sp) == 0  # no update, nothing donated
        _, metrics = step(state, batch, tp)
        np.testing.assert_allclose(float(metrics["loss"]), float(out["loss"]), rtol=1e-5)


def test_rl_step_in_the_reference_order(models):
    """Two PPO mini-batches of one rollout batch, as veRL runs them: critic values, advantages
    and whitening once over the whole batch at the pre-update parameters, then the updates.
    ``prepare_rollout`` against NumPy ports of veRL's GAE and masked whitening and of DGPO's
    KL-in-reward; the second mini-batch's policy and value losses against NumPy with those
    fixed arrays (value-clip anchor = the pre-update values) at the parameters after the first
    update."""
    sc, sp, tc, tp = models
    cfg = get_objective("dgpo", critic="value_head", beta=0.5)
    step = make_update_step(
        cfg, sc, None, optimizer=optax.sgd(0.5), micro_batches=2, compiler_options=FAST
    )
    keys = (
        "input_ids",
        "attention_mask",
        "loss_mask",
        "old_logprobs",
        "rewards",
        "teacher_logprobs",
    )
    one, two = (make_batch(models, seed=s) for s in (0, 1))
    two["rewards"] = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
    batch = {k: np.concatenate([one[k], two[k]]) for k in keys}
    state = create_update_state(cfg, copy_params(sp), step.tx, 0)
    prepared, whole = step.prepare_rollout(state, batch, None, micro_batches=4)
    prepared = jax.device_get(prepared)
    v0 = np.asarray(prepared["values"], np.float64)

    # NumPy: token rewards, GAE over each row's student tokens, whitening over all 8 rows
    lm = batch["loss_mask"].astype(np.float64)
    last = np.zeros_like(lm)
    last[np.arange(8), [np.flatnonzero(r)[-1] for r in lm]] = 1.0
    scores = batch["rewards"][:, None].astype(np.float64) * last
    tok_r = ref_dgpo_token_level_rewards(
        scores,
        batch["old_logprobs"].astype(np.float64),
        batch["teacher_logprobs"].astype(np.float64),
        lm,
        0.5,
    )
    raw = np.zeros_like(lm)
    for i in range(8):
        keep = lm[i] > 0
        raw[i, keep] = ref_gae_recursion(tok_r[i][keep][None], v0[i][keep][None], 1.0, 1.0)[0]
    keep = lm > 0
    want_adv = np.zeros_like(lm)
    want_adv[keep] = ref_masked_whiten(raw[keep], np.ones(keep.sum()))
    returns = (raw + v0) * lm
    np.testing.assert_allclose(prepared["advantages"], want_adv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prepared["returns"], returns, rtol=1e-4, atol=1e-4)

    first = {k: v[:4] for k, v in prepared.items()}
    second = {k: v[4:] for k, v in prepared.items()}
    state1, _ = step(state, first, None)
    # the second mini-batch's inputs at the parameters after the first update
    policy1 = jax.device_get(state1.params["policy"])
    lp1 = token_logprobs(sc, policy1, second["input_ids"], second["attention_mask"])
    v1 = np.asarray(
        jax.device_get(
            step.prepare_rollout(state1, {k: second[k] for k in keys}, None, micro_batches=2)[0][
                "values"
            ]
        ),
        np.float64,
    )
    _, m2 = step(state1, second, None)
    m2 = jax.device_get(m2)

    def np_losses(adv, anchor):
        lm2 = lm[4:]
        rho = np.exp(lp1 - second["old_logprobs"])
        pg = np.maximum(-adv * rho, -adv * np.clip(rho, 0.8, 1.2))
        v_clip = anchor + np.clip(v1 - anchor, -0.5, 0.5)
        vl = 0.5 * np.maximum((v1 - returns[4:]) ** 2, (v_clip - returns[4:]) ** 2)
        return (pg * lm2).sum() / lm2.sum(), (vl * lm2).sum() / lm2.sum()

    want_pg, want_vl = np_losses(want_adv[4:], v0[4:])
    assert float(m2["policy_loss"]) == pytest.approx(want_pg, rel=1e-3, abs=1e-5)
    assert float(m2["value_loss"]) == pytest.approx(want_vl, rel=1e-3, abs=1e-5)
    # The mini-batch-local order (whitening over these 4 rows, values of the updated critic)
    # gives other numbers, so the test tells the two orders apart.
    local = np.zeros_like(lm[4:])
    k2 = keep[4:]
    local[k2] = ref_masked_whiten(raw[4:][k2], np.ones(k2.sum()))
    assert abs(np_losses(local, v0[4:])[0] - want_pg) > 1e-3
    assert float(whole["gate_share"]) == pytest.approx(5 / 8)


BACKEND_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *_, **__: (
        BACKEND_COMPILES.append(event)
        if event == "/jax/core/compile/backend_compile_duration"
        else None
    )
)


def test_compile_ahead_of_time_on_a_mesh_then_run_that_program(models):
    """``UpdateStep.compile`` from abstract arguments only (the state of
    ``abstract_update_state`` and the batch of ``abstract_batch``, sharded over a 2x4 mesh)
    gives a compiled program with a memory analysis; the step called with concrete arguments
    of those shapes and shardings runs it without compiling again, and computes what the
    jitted step computes."""
    sc, sp, tc, tp = models
    cfg = get_objective("grpo")
    plan = plan_from_config({"data": 2, "fsdp": -1})
    tx = optax.sgd(0.1)
    step = make_update_step(cfg, sc, optimizer=tx, plan=plan, compiler_options=FAST)
    shapes, shardings = param_shapes(sc), plan.param_shardings(sc)
    abstract_params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    abstract_state = abstract_update_state(cfg, abstract_params, tx)
    abstract_batch = step.abstract_batch(B, T, packed=False)
    compiled = step.compile(abstract_state, abstract_batch)
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert step.compile(abstract_state, abstract_batch) is compiled  # kept, not recompiled

    batch = {k: v for k, v in make_batch(models).items() if k in abstract_batch}
    state = create_update_state(cfg, plan.shard_params(sc, copy_params(sp)), tx, 0)
    n = len(BACKEND_COMPILES)
    new_state, metrics = step(state, batch)
    assert len(BACKEND_COMPILES) == n, "the call compiled the step again"
    assert float(metrics["skipped"]) == 0 and int(new_state.step) == 1

    jitted = make_update_step(cfg, sc, optimizer=tx, plan=plan, compiler_options=FAST)
    state = create_update_state(cfg, plan.shard_params(sc, copy_params(sp)), tx, 0)
    _, want = jitted(state, batch)
    assert len(BACKEND_COMPILES) > n  # (the listener does see compiles)
    for k in ("loss", "grad_norm", "kl_loss", "entropy"):
        np.testing.assert_allclose(float(metrics[k]), float(want[k]), rtol=1e-6, err_msg=k)


def test_trim_to_bucket_counts_down_from_the_data_width():
    """Hand cases: buckets are multiples of 64 by default; anchored at the data's width (its
    longest sequence rounded up to 16) they are that width less whole multiples of 64, so a
    batch whose longest row is near the data's longest takes the data's width; a batch longer
    than the anchor (not from that data) falls back to the multiples."""
    lengths = np.array([91, 100, 150, 120])
    mask = (np.arange(192)[None] < lengths[:, None]).astype(np.int32)
    data = {"input_ids": mask * 7, "attention_mask": mask, "rewards": np.ones(4)}
    top = pack_width(trajectory_lengths(mask), TOP_MULTIPLE)
    assert top == 160 and pack_width(trajectory_lengths(mask)) == 192
    rows = lambda *i: {k: v[list(i)] for k, v in data.items()}
    width = lambda b, **kw: trim_to_bucket(b, **kw)["input_ids"].shape[1]
    assert [width(rows(2)), width(rows(1)), width(rows(0))] == [192, 128, 128]
    assert [width(rows(2), top=top), width(rows(1, 3), top=top), width(rows(0), top=top)] == [
        160,
        160,
        96,
    ]
    assert width(rows(0), top=top, multiple=32) == 96 and width(rows(1), top=80) == 128
    trimmed = trim_to_bucket(rows(0, 2), top=top)
    np.testing.assert_array_equal(trimmed["attention_mask"], mask[[0, 2], :160])
    np.testing.assert_array_equal(trimmed["rewards"], [1, 1])


def test_right_aligned_and_trimmed_batch_gives_the_same_step(models):
    """A rollout batch as ``score_rollout`` lays it out (a left-padded prompt block, then a
    right-padded response block, then the rollout buffer's spare columns) and the same batch
    after ``right_align`` + ``fit_width`` (what ``train.pack=False`` trains on): the same
    DGPO step (critic values computed in the program, GAE, whitening), in fewer columns. And
    the helpers on a hand example."""
    m = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    ids = (np.arange(18).reshape(3, 6) + 1) * m
    hand = right_align({"input_ids": ids, "attention_mask": m, "rewards": np.ones(3)})
    np.testing.assert_array_equal(
        hand["input_ids"], [[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 0, 0], [0] * 6]
    )
    np.testing.assert_array_equal(
        hand["attention_mask"], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0] * 6]
    )
    assert fit_width(hand, (2, 4, 6))["input_ids"].shape == (3, 4)
    assert fit_width(hand, (2, 3))["input_ids"].shape == (
        3,
        64,
    )  # past the buckets: a multiple of 64
    assert width_buckets(320, 4) == (128, 192, 256, 320)
    assert width_buckets(300, 0) == (320,)

    sc, sp, tc, tp = models
    r = np.random.default_rng(3)
    prompt_len, resp_len = np.array([3, 5, 2, 4]), np.array([6, 3, 7, 0])  # row 3: no response
    p_width, r_width, spare = 5, 8, 7
    width = p_width + r_width + spare
    ids = np.zeros((B, width), np.int32)
    am = np.zeros((B, width), np.int32)
    lm = np.zeros((B, width), np.float32)
    for i in range(B):
        a = p_width - prompt_len[i]
        ids[i, a:p_width] = r.integers(1, V, prompt_len[i])
        am[i, a:p_width] = 1
        ids[i, p_width : p_width + resp_len[i]] = r.integers(1, V, resp_len[i])
        am[i, p_width : p_width + resp_len[i]] = 1
        lm[i, p_width : p_width + resp_len[i]] = 1
    lm[0, p_width + 2 : p_width + 4] = 0  # an observation
    full = dict(
        input_ids=ids,
        attention_mask=am,
        loss_mask=lm,
        old_logprobs=token_logprobs(sc, sp, ids, am) * lm,
        teacher_logprobs=token_logprobs(tc, tp, ids, am) * lm,
        rewards=np.array([0.0, 1.0, 0.0, 0.0], np.float32),
    )
    cut = fit_width(right_align(full), (8, 10, 20))  # the longest row: 2 + 7
    assert cut["input_ids"].shape == (B, 10)
    assert cut["attention_mask"].sum() == am.sum() and cut["loss_mask"].sum() == lm.sum()
    cfg = get_objective("dgpo", beta=0.5, critic="value_head")
    step = make_update_step(cfg, sc, None, optimizer=optax.sgd(0.5), compiler_options=FAST)
    outs = []
    for batch in (full, cut):
        state = create_update_state(cfg, copy_params(sp), step.tx, 0)
        new, metrics = step(state, batch)
        outs.append((jax.device_get(new.params), jax.device_get(metrics)))
    (p_full, m_full), (p_cut, m_cut) = outs
    for k in ("loss", "policy_loss", "value_loss", "token_reward_mean", "grad_norm"):
        np.testing.assert_allclose(m_cut[k], m_full[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # float32 sums in another order; the step itself moves the weights by far more
    assert max_abs_diff(p_cut, p_full) < 1e-5
    assert max_abs_diff(p_full["policy"], sp) > 1e-2


def _fewest_positions(sorted_lengths, groups, widths, quantum):
    """Brute force: the fewest positions (sum of rows x width) over every cut of the sorted
    rows into at most ``groups`` runs of multiples of ``quantum`` rows."""
    import itertools  # noqa: PLC0415

    rows = len(sorted_lengths)
    cuts = [c for c in range(quantum, rows, quantum)]
    best = None
    for k in range(groups):
        for inner in itertools.combinations(cuts, k):
            bounds = (0, *inner, rows)
            cost = sum(
                (b - a) * min(w for w in widths if w >= max(sorted_lengths[b - 1], 1))
                for a, b in zip(bounds, bounds[1:])
            )
            best = cost if best is None else min(best, cost)
    return best


def test_length_groups_on_hand_batches():
    """Rows sorted by length, runs of whole quanta of rows, each run at the smallest bucket
    holding its longest row, the fewest positions (against a brute force over every cut);
    a compiled grouping reused when it holds the rows within the slack."""
    lengths = np.array([11, 3, 7, 0, 12, 5])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    batch = {"attention_mask": mask, "rewards": np.arange(6.0), "taid_t": np.float32(0.5)}
    out, groups = length_groups(batch, 3, (4, 8, 12))
    assert groups == ((2, 4), (2, 8), (2, 12))  # lengths (0, 3), (5, 7), (11, 12): 48 positions
    np.testing.assert_array_equal(out["rewards"], [3, 1, 5, 2, 0, 4])
    np.testing.assert_array_equal(out["attention_mask"].sum(1), [0, 3, 5, 7, 11, 12])
    assert out["taid_t"] == np.float32(0.5)
    assert length_groups(batch, 6, (4, 8, 12))[1] == groups  # no cheaper cut with more runs
    assert length_groups(batch, 2, (6,))[1] == ((3, 6), (3, 12))  # past the buckets: the width
    long = {"attention_mask": np.ones((4, 8), np.int32)}
    assert length_groups(long, 2, (4, 8))[1] == ()  # one width holds every row
    assert length_groups(batch, 1, (4, 8, 12)) == (batch, ())
    r = np.random.default_rng(0)
    for trial in range(20):
        n, g = int(r.integers(2, 33)), int(r.integers(1, 4))
        ls = np.sort(r.integers(0, 200, n))
        widths = (64, 128, 192, 256)
        found = best_row_groups(ls, g, widths)
        whole = ((n, min(w for w in widths if w >= max(ls[-1], 1))),)
        quantum = max(1, n // 8)
        positions = sum(a * b for a, b in found or whole)
        assert positions == _fewest_positions(ls, g, widths, quantum), (trial, ls, g, found)
        assert all(a % quantum == 0 for a, _ in found[:-1]) and len(found) <= g
    # compiled groupings: reused within 10% more positions, when they hold the rows
    eight = {"attention_mask": (np.arange(8)[None] < np.array([2, 6] * 4)[:, None]).astype(int)}
    assert length_groups(eight, 2, (4, 8))[1] == ((4, 4), (4, 8))  # 48 positions
    assert length_groups(eight, 2, (4, 8), known=[()])[1] == ((4, 4), (4, 8))  # 64: too many
    assert length_groups(eight, 2, (4, 8), known=[(), ((3, 4), (5, 8))])[1] == ((3, 4), (5, 8))
    assert length_groups(eight, 2, (4, 8), known=[((5, 4), (3, 8))])[1] == ((4, 4), (4, 8))
    # a run's grouper: reuse while a compile (9 updates' time here) costs more than it saves
    grouper = RowGrouper(2, (4, 8))
    assert grouper(eight, 100)[1] == ((4, 4), (4, 8))  # nothing compiled: the best
    grouper.record(8, ((3, 4), (5, 8)), 10.0)  # (as if that one had been compiled)
    assert grouper(eight, 100)[1] == ((3, 4), (5, 8))  # no steady update timed yet: keep it
    grouper.record(8, ((3, 4), (5, 8)), 1.0)
    # 52 positions against 48: 8.3% of an update saved per update; a compile costs 9 updates
    assert grouper(eight, 200)[1] == ((4, 4), (4, 8))  # 8.3% x 200 updates > 9
    assert grouper(eight, 100)[1] == ((3, 4), (5, 8))  # 8.3% x 100 updates < 9


@pytest.mark.parametrize(
    "name, overrides, on_policy",
    [("dgpo", {"critic": "separate", "beta": 0.5}, True), ("kd", {}, False)],
    ids=["dgpo-on-policy", "kd-teacher-forward"],
)
def test_length_grouped_step_equals_the_whole_batch_step(models, name, overrides, on_policy):
    """The step on rows of 2-12 real tokens in 16 columns against the same rows sorted by
    length and run as groups of 8, 12 and 16 columns (3, 2 and 1 rows) (``length_groups`` + ``row_groups``):
    the same updated parameters (policy and critic) and metrics. DGPO as the quickstart runs
    it (on-policy: behaviour log-probs, critic values and the teacher's log-probs from the
    step's own grouped passes, whole-batch GAE and whitening) and KD (the teacher's full
    logits in the differentiated pass)."""
    sc, sp, tc, tp = models
    cfg = get_objective(name, **overrides)
    rows, width = 6, 16
    r = np.random.default_rng(5)
    lengths = np.array([12, 4, 9, 2, 16, 6])
    am = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    lm = am * (np.arange(width)[None] >= 2).astype(np.float32)
    batch = dict(
        input_ids=(r.integers(1, V, (rows, width)) * am).astype(np.int32),
        attention_mask=am,
        loss_mask=lm,
        rewards=np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], np.float32),
    )
    if not on_policy:
        batch["old_logprobs"] = token_logprobs(sc, sp, batch["input_ids"], am) * lm
    batch = select(batch, cfg, True)
    grouped, groups = length_groups(batch, 3, (8, 12))
    assert groups == ((3, 8), (2, 12), (1, 16))  # lengths (2, 4, 6), (9, 12), (16)
    step = make_update_step(
        cfg, sc, tc, optimizer=optax.sgd(0.5), compiler_options=FAST, on_policy=on_policy
    )
    out = []
    for b, g in ((batch, None), (grouped, groups)):
        state = create_update_state(cfg, copy_params(sp), step.tx, 0)
        new, metrics = step(state, b, tp, row_groups=g)
        out.append((jax.device_get(new.params), jax.device_get(metrics)))
    (p0, m0), (p1, m1) = out
    assert max_abs_diff(p0["policy"], sp) > 1e-3  # the step moved the policy
    assert max_abs_diff(p0, p1) < 1e-5
    for k in ("loss", "policy_loss", "value_loss", "advantage_mean", "divergence", "grad_norm"):
        if k in m0:
            assert float(m1[k]) == pytest.approx(float(m0[k]), rel=1e-4, abs=1e-6), k
    with pytest.raises(ValueError, match=r"row_groups \(\(3, 8\), \(2, 12\)\): row counts"):
        step(state, grouped, tp, row_groups=groups[:2])
    two = make_update_step(cfg, sc, tc, micro_batches=2)
    given = dict(grouped, old_logprobs=np.zeros((rows, width), np.float32))
    with pytest.raises(ValueError, match="one micro-batch \\(got micro_batches=2\\)"):
        two(state, given, tp, row_groups=groups)
    assert two._jitted is None  # refused before any compile


@pytest.mark.parametrize(
    "name, overrides",
    [("dgpo", {"critic": "separate", "beta": 0.5}), ("opd", {})],
    ids=["dgpo-separate-critic", "opd"],
)
def test_on_policy_step_equals_separate_behaviour_and_critic_passes(models, name, overrides):
    """``on_policy=True`` (one update per rollout batch: behaviour log-probs and old values
    from the step's own forward) against the step fed the behaviour log-probs of an
    independent forward (``forward`` + log-softmax here) and computing the critic's old values
    in its pre-pass: the same updated parameters (policy and critic) and the same metrics.
    DGPO as the quickstart runs it (GAE, a separate critic, the teacher's log-probs from the
    in-program pre-pass) and OPD (immediate token rewards from the behaviour log-probs)."""
    sc, sp, tc, tp = models
    cfg = get_objective(name, **overrides)
    full = make_batch(models, seed=3)
    full["rewards"] = np.array([1.0, 0.0, 0.0, 0.0], np.float32)  # three KL-pulled rows
    batch = {
        k: v for k, v in select(full, cfg, True).items() if k not in ("teacher_logprobs", "values")
    }
    out = {}
    for on_policy in (False, True):
        step = make_update_step(
            cfg, sc, tc, optimizer=optax.sgd(0.5), compiler_options=FAST, on_policy=on_policy
        )
        state = create_update_state(cfg, copy_params(sp), step.tx, 0)
        given = {k: v for k, v in batch.items() if not (on_policy and k == "old_logprobs")}
        new, metrics = step(state, given, tp)
        out[on_policy] = (jax.device_get(new.params), jax.device_get(metrics))
    (p0, m0), (p1, m1) = out[False], out[True]
    assert max_abs_diff(p0, sp) > 1e-3  # the step moved the policy
    assert max_abs_diff(p0, p1) < 1e-5
    for k in ("loss", "policy_loss", "value_loss", "advantage_mean", "token_reward_mean"):
        if k in m0:
            assert float(m1[k]) == pytest.approx(float(m0[k]), rel=1e-4, abs=1e-6), k
    assert float(m1["clip_frac"]) == 0.0 and abs(float(m1["approx_kl_old"])) < 1e-6
    if cfg.critic == "separate":
        assert "value_loss" in m1 and max_abs_diff(p0["critic"], p1["critic"]) < 1e-5


def test_on_policy_step_refuses_what_it_computes_itself(models):
    sc, sp, tc, tp = models
    cfg = get_objective("dgpo", critic="separate")
    batch = select(make_batch(models), cfg, False)
    step = make_update_step(cfg, sc, on_policy=True)
    for extra in ({}, {"values": make_batch(models)["values"]}):
        with pytest.raises(ValueError, match=r"carries \['old_logprobs'.*on_policy"):
            step(None, dict(batch, **extra))
    with pytest.raises(ValueError, match="on_policy"):
        step.prepare_rollout(None, batch)
    with pytest.raises(ValueError, match="on_policy=True needs micro_batches=1, got 2"):
        make_update_step(cfg, sc, micro_batches=2, on_policy=True)
    assert step._jitted is None  # nothing was compiled
