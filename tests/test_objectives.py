"""Objective building blocks against NumPy references written here from the formulas of
docs/algorithms.md: KL estimators, advantage estimators, losses, divergences (chunked, from a tiny
model's hidden states), rewards/gates, presets, schedules and config validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgpo_jax.curricula import schedules
from dgpo_jax.learner.optim import OptimConfig, learning_rates
from dgpo_jax.learner.update_step import _response_region
from dgpo_jax.models import forward, forward_hidden, get_preset, lm_logits
from dgpo_jax.objectives import advantages as adv
from dgpo_jax.objectives import divergences as dv
from dgpo_jax.objectives import losses, presets
from dgpo_jax.objectives.config import ObjectiveConfig
from dgpo_jax.objectives.kl import kl_estimate
from dgpo_jax.objectives.rewards import token_rewards, trajectory_gate
from tests.conftest import random_params

RNG = np.random.default_rng(1234)


def _masks(b, t, rng):
    """A loss mask with a prompt, an observation hole and right padding per row."""
    m = np.zeros((b, t), np.float32)
    for i in range(b):
        start = rng.integers(1, 3)
        end = rng.integers(t - 3, t + 1)
        m[i, start:end] = 1
        hole = rng.integers(start, max(start + 1, end - 2))
        m[i, hole : hole + 2] = 0  # an observation inside the response
    return m


# ------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------
def np_kl(ls, lm, est, direction, clamp=20.0):
    d = np.clip(ls - lm, -clamp, clamp).astype(np.float64)
    if direction == "reverse":
        return {"k1": d, "k2": d * d / 2, "k3": np.exp(-d) - 1 + d}[est]
    q = np.exp(-d)
    return {"k1": q * -d, "k2": q * d * d / 2, "k3": q * -d - (q - 1)}[est]


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_kl_estimators_match_numpy(est, direction):
    for case in range(3):
        ls = RNG.normal(-2, 1.5, (3, 7)).astype(np.float32)
        lm = RNG.normal(-2, 1.5, (3, 7)).astype(np.float32)
        if case == 2:  # huge log-ratios are clamped to +-20 before exp
            ls[0, 0], lm[0, 0], ls[1, 1], lm[1, 1] = 0.0, -60.0, -70.0, 0.0
        got = np.asarray(kl_estimate(jnp.asarray(ls), jnp.asarray(lm), est, direction))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, np_kl(ls, lm, est, direction), rtol=2e-5, atol=1e-5)


def test_kl_estimators_expectations():
    """Under samples from S, k1 and k3 average to KL(S||M) (reverse), and the forward forms to
    KL(M||S): checked exactly by weighting every category by p_S."""
    p_s = np.array([0.5, 0.3, 0.15, 0.05])
    p_m = np.array([0.25, 0.25, 0.25, 0.25])
    ls, lm = np.log(p_s), np.log(p_m)
    kl_sm = np.sum(p_s * (ls - lm))
    kl_ms = np.sum(p_m * (lm - ls))
    for est in ("k1", "k3"):
        rev = np.asarray(kl_estimate(jnp.asarray(ls), jnp.asarray(lm), est, "reverse"))
        fwd = np.asarray(kl_estimate(jnp.asarray(ls), jnp.asarray(lm), est, "forward"))
        np.testing.assert_allclose(np.sum(p_s * rev), kl_sm, rtol=1e-5)
        np.testing.assert_allclose(np.sum(p_s * fwd), kl_ms, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(jnp.zeros(2), jnp.zeros(2), "k4")


# ------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------
def np_gae(r, v, m, gamma, lam):
    b, t = r.shape
    a = np.zeros((b, t))
    for i in range(b):
        steps = [j for j in range(t) if m[i, j] > 0]
        nxt_v, nxt_a = 0.0, 0.0
        for j in reversed(steps):
            delta = r[i, j] + gamma * nxt_v - v[i, j]
            a[i, j] = delta + gamma * lam * nxt_a
            nxt_v, nxt_a = v[i, j], a[i, j]
    return a, (a + v) * m


def test_gae_matches_numpy_with_observation_holes():
    for gamma, lam in [(1.0, 1.0), (0.9, 0.95), (0.5, 0.0)]:
        m = _masks(4, 12, RNG)
        r = RNG.normal(size=(4, 12)).astype(np.float32) * m
        v = RNG.normal(size=(4, 12)).astype(np.float32)
        a, ret = adv.gae_advantages(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
        ra, rret = np_gae(r, v, m, gamma, lam)
        np.testing.assert_allclose(np.asarray(a), ra, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ret), rret, rtol=1e-5, atol=1e-5)


def test_gae_ignores_values_and_rewards_on_masked_tokens():
    m = _masks(3, 10, RNG)
    r = RNG.normal(size=(3, 10)).astype(np.float32) * m
    v = RNG.normal(size=(3, 10)).astype(np.float32)
    v2 = np.where(m > 0, v, 1e3).astype(np.float32)
    a1, _ = adv.gae_advantages(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m))
    a2, _ = adv.gae_advantages(jnp.asarray(r), jnp.asarray(v2), jnp.asarray(m))
    np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), atol=1e-5)


def test_reference_quirk_region_includes_observations():
    """The quirk mask covers real tokens from the first student token on (observations too), so
    GAE then runs over the observation tokens; the default mask skips them."""

    am = np.ones((2, 8), np.float32)
    am[1, -1] = 0
    lm = np.array([[0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 1, 0, 1, 1, 1, 0]], np.float32)
    region = np.asarray(_response_region(jnp.asarray(am), jnp.asarray(lm)))
    np.testing.assert_array_equal(region, [[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 0]])
    r = RNG.normal(size=(2, 8)).astype(np.float32) * lm
    v = RNG.normal(size=(2, 8)).astype(np.float32)
    a_quirk, _ = adv.gae_advantages(jnp.asarray(r), jnp.asarray(v), jnp.asarray(region), 0.9, 0.95)
    np.testing.assert_allclose(np.asarray(a_quirk), np_gae(r, v, region, 0.9, 0.95)[0], atol=1e-5)
    a_default, _ = adv.gae_advantages(jnp.asarray(r), jnp.asarray(v), jnp.asarray(lm), 0.9, 0.95)
    assert not np.allclose(np.asarray(a_quirk) * lm, np.asarray(a_default))


def test_grpo_matches_numpy():
    for case in range(3):
        b = 8
        r = RNG.integers(0, 2, b).astype(np.float32) + RNG.normal(0, 0.1, b).astype(np.float32)
        g = RNG.integers(0, 3, b).astype(np.int32)
        if case == 0:
            g[-1] = 99  # a group of one: mean 0, std 1
        m = _masks(b, 6, RNG)
        got = np.asarray(adv.grpo_advantages(jnp.asarray(r), jnp.asarray(g), jnp.asarray(m)))
        want = np.zeros(b)
        for i in range(b):
            grp = r[g == g[i]]
            if len(grp) == 1:
                want[i] = r[i] / (1.0 + 1e-6)
            else:
                want[i] = (r[i] - grp.mean()) / (grp.std(ddof=1) + 1e-6)
        np.testing.assert_allclose(got, want[:, None] * m, rtol=1e-4, atol=1e-5)


def test_reward_to_go_and_immediate_match_numpy():
    m = _masks(3, 9, RNG)
    r = RNG.normal(size=(3, 9)).astype(np.float32) * m
    for gamma in (1.0, 0.8):
        got = np.asarray(adv.reward_to_go_advantages(jnp.asarray(r), jnp.asarray(m), gamma))
        want = np.zeros_like(r)
        for i in range(3):
            idx = np.nonzero(m[i])[0]
            for k, j in enumerate(idx):
                want[i, j] = sum(gamma ** (k2 - k) * r[i, idx[k2]] for k2 in range(k, len(idx)))
            want[i] /= max(len(idx), 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(adv.immediate_advantages(jnp.asarray(r), jnp.asarray(m))), r * m
    )


def test_masked_whiten_and_outcome_placement():
    m = _masks(4, 10, RNG)
    x = RNG.normal(3, 2, (4, 10)).astype(np.float32)
    got = np.asarray(adv.masked_whiten(jnp.asarray(x), jnp.asarray(m)))
    vals = x[m > 0]
    want = (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) * m
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    got_ns = np.asarray(adv.masked_whiten(jnp.asarray(x), jnp.asarray(m), shift_mean=False))
    np.testing.assert_allclose(got_ns, want + vals.mean() * m, rtol=1e-4, atol=1e-5)
    r = np.array([1.0, 0.0, 2.0, 3.0], np.float32)
    placed = np.asarray(adv.place_outcome_reward(jnp.asarray(r), jnp.asarray(m)))
    for i in range(4):
        last = np.nonzero(m[i])[0][-1]
        assert placed[i, last] == r[i] and np.sum(placed[i]) == r[i]


# ------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------
def np_ppo(lp, old, a, lo, hi, dual=None):
    ratio = np.exp(lp - old)
    l1, l2 = -a * ratio, -a * np.clip(ratio, 1 - lo, 1 + hi)
    out = np.maximum(l1, l2)
    if dual is not None:
        out = np.where(a < 0, np.minimum(out, -a * dual), out)
    return out


def test_ppo_clip_dual_clip_is_and_values_match_numpy():
    for case in range(3):
        lp = RNG.normal(-2, 1, (3, 8)).astype(np.float32)
        old = (lp + RNG.normal(0, 0.6, (3, 8))).astype(np.float32)
        a = RNG.normal(0, 1, (3, 8)).astype(np.float32)
        lo, hi = [(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)][case]
        for dual in (None, 3.0):
            got, clipped = losses.ppo_clip_loss(
                jnp.asarray(lp), jnp.asarray(old), jnp.asarray(a), lo, hi, dual
            )
            np.testing.assert_allclose(
                np.asarray(got), np_ppo(lp, old, a, lo, hi, dual), rtol=1e-5, atol=1e-6
            )
            # clipped tokens are exactly those with zero gradient
            g = jax.grad(
                lambda x: jnp.sum(
                    losses.ppo_clip_loss(x, jnp.asarray(old), jnp.asarray(a), lo, hi, dual)[0]
                )
            )(jnp.asarray(lp))
            np.testing.assert_array_equal(np.asarray(clipped) > 0, np.asarray(g) == 0)
        got_is = losses.importance_sampling_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(a))
        np.testing.assert_allclose(np.asarray(got_is), -a * np.exp(lp - old), rtol=1e-5)
        samp = (old + RNG.normal(0, 1, old.shape)).astype(np.float32)
        w = losses.truncated_is_weight(jnp.asarray(old), jnp.asarray(samp), 5.0)
        np.testing.assert_allclose(np.asarray(w), np.minimum(np.exp(old - samp), 5.0), rtol=1e-5)
        v, v_old, ret = (RNG.normal(size=(3, 8)).astype(np.float32) for _ in range(3))
        got_v = losses.value_loss(jnp.asarray(v), jnp.asarray(v_old), jnp.asarray(ret), 0.5)
        vc = v_old + np.clip(v - v_old, -0.5, 0.5)
        np.testing.assert_allclose(
            np.asarray(got_v), 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2), rtol=1e-5
        )
        m = _masks(3, 8, RNG)
        ev = losses.explained_variance(jnp.asarray(ret), jnp.asarray(v), jnp.asarray(m))
        sel = m > 0
        np.testing.assert_allclose(
            float(ev), 1 - np.var((ret - v)[sel]) / np.var(ret[sel]), rtol=1e-4
        )


def test_ppo_with_k1_reward_gives_reverse_kl_gradient():
    """Tiny categorical policy pi = softmax(theta), teacher q. At the on-policy point the
    expected PPO-clip gradient with the k1 reward A(y) = l^T(y) - l^S(y) (OPD config, gamma 0)
    equals the analytic gradient of -KL(pi || q): d KL / d theta_j = pi_j (log pi_j/q_j - KL)."""
    cfg = presets.get_objective("opd")
    for seed in range(3):
        r = np.random.default_rng(seed)
        k = 6
        theta = jnp.asarray(r.normal(size=k).astype(np.float32))
        logq = jnp.asarray(np.log(r.dirichlet(np.ones(k))).astype(np.float32))
        ids = jnp.arange(k)

        def expected_loss(th):
            logp_all = jax.nn.log_softmax(th)
            old = jax.lax.stop_gradient(logp_all)
            lp = logp_all[ids][None]  # each category as one "token" row, weighted by pi_old
            mask = jnp.ones_like(lp)
            tok_r, _ = token_rewards(
                cfg, mask, logp_student=old[ids][None], logp_teacher=logq[None]
            )
            loss, _ = losses.ppo_clip_loss(lp, old[ids][None], tok_r)
            return jnp.sum(jnp.exp(old) * loss[0])

        g = np.asarray(jax.grad(expected_loss)(theta))
        pi = np.asarray(jax.nn.softmax(theta), np.float64)
        lq = np.asarray(logq, np.float64)
        kl = np.sum(pi * (np.log(pi) - lq))
        analytic = pi * (np.log(pi) - lq - kl)  # gradient of KL(pi||q): minimising the loss
        np.testing.assert_allclose(g, analytic, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Divergences
# ------------------------------------------------------------------------------------------
def np_logsoftmax(z):
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl_full(p, q):
    return np.sum(np.exp(p) * (p - q), -1)


def np_divergence(kind, zs, zt, **kw):
    s, t = np_logsoftmax(zs), np_logsoftmax(zt)
    if kind == "fkl":
        return np_kl_full(t, s)
    if kind == "rkl":
        return np_kl_full(s, t)
    if kind == "jsd":
        b = kw["beta"]
        mix = np.log(b * np.exp(t) + (1 - b) * np.exp(s))
        return b * np_kl_full(t, mix) + (1 - b) * np_kl_full(s, mix)
    if kind == "skew_fkl":
        a = kw["alpha"]
        return np_kl_full(t, np.log(a * np.exp(t) + (1 - a) * np.exp(s)))
    if kind == "skew_rkl":
        a = kw["alpha"]
        return np_kl_full(s, np.log(a * np.exp(s) + (1 - a) * np.exp(t)))
    if kind == "taid":
        tt = kw["t"]
        target = np_logsoftmax((1 - tt) * zs + tt * zt)
        return np_kl_full(target, s)
    if kind == "topk_fkl":
        idx = np.argsort(-t, axis=-1)[..., : kw["k"]]
        tk = np.take_along_axis(t, idx, -1)
        sk = np.take_along_axis(s, idx, -1)
        tk = tk - np.log(np.exp(tk).sum(-1, keepdims=True))
        sk = sk - np.log(np.exp(sk).sum(-1, keepdims=True))
        return np_kl_full(tk, sk)
    raise AssertionError(kind)


SPECS = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.7}),
    ("skew_fkl", {"alpha": 0.1}),
    ("skew_rkl", {"alpha": 0.3}),
    ("taid", {"t": 0.4}),
    ("topk_fkl", {"k": 5}),
]


def _spec(kind, kw):
    return dv.DivergenceSpec(
        kind, top_k=kw.get("k", 0), jsd_beta=kw.get("beta", 0.1), skew_alpha=kw.get("alpha", 0.1)
    )


@pytest.mark.parametrize("kind,kw", SPECS)
def test_divergences_match_numpy(kind, kw):
    for _ in range(2):
        zs = RNG.normal(0, 2, (2, 3, 17)).astype(np.float32)
        zt = RNG.normal(0, 2, (2, 3, 17)).astype(np.float32)
        got = dv.divergence(_spec(kind, kw), jnp.asarray(zs), jnp.asarray(zt), kw.get("t"))
        np.testing.assert_allclose(
            np.asarray(got), np_divergence(kind, zs, zt, **kw), rtol=1e-4, atol=1e-6
        )
        if kind != "topk_fkl":  # zero when the two distributions agree
            same = dv.divergence(_spec(kind, kw), jnp.asarray(zs), jnp.asarray(zs), kw.get("t"))
            np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-5)


def test_chunked_token_stats_match_full_logits():
    """From a tiny model's hidden states, chunk sizes that do and do not divide T, against NumPy
    on the full-logit forward (``dgpo_jax.forward``)."""
    v = 40
    sc = get_preset("tiny", vocab_size=v, num_hidden_layers=1)
    tc = get_preset("tiny-teacher", vocab_size=v, num_hidden_layers=1)
    sp, tp = random_params(sc, 0), random_params(tc, 1)
    sp = jax.tree.map(lambda x: x * 8 if x.ndim == 2 and x.shape[0] == v else x, sp)
    b, t = 2, 9
    ids = jnp.asarray(RNG.integers(0, v, (b, t)), jnp.int32)
    am = jnp.asarray([[1] * t, [0, 0] + [1] * (t - 2)], jnp.int32)  # one left-padded row
    zs = np.asarray(forward(sc, sp, ids, am))
    zt = np.asarray(forward(tc, tp, ids, am))
    s_lp, t_lp = np_logsoftmax(zs), np_logsoftmax(zt)
    want_lp = np.zeros((b, t))
    want_lp[:, 1:] = np.take_along_axis(s_lp[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]
    want_tlp = np.zeros((b, t))
    want_tlp[:, 1:] = np.take_along_axis(t_lp[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]
    want_ent = np.zeros((b, t))
    want_ent[:, 1:] = -np.sum(np.exp(s_lp) * s_lp, -1)[:, :-1]
    want_jsd = np.zeros((b, t))
    want_jsd[:, 1:] = np_divergence("jsd", zs, zt, beta=0.3)[:, :-1]
    hs, ht = forward_hidden(sc, sp, ids, am), forward_hidden(tc, tp, ids, am)

    @jax.jit
    def stats(sp, tp, hs, ht):
        return {
            chunk: dv.chunked_token_stats(
                lambda x: lm_logits(sc, sp, x),
                hs,
                ids,
                teacher_logits_fn=lambda x: lm_logits(tc, tp, x),
                teacher_hidden=ht,
                want_entropy=True,
                want_teacher_logp=True,
                divergences={"jsd": dv.DivergenceSpec("jsd", jsd_beta=0.3)},
                chunk=chunk,
            )
            for chunk in (3, 128)
        }

    for out in stats(sp, tp, hs, ht).values():
        np.testing.assert_allclose(np.asarray(out["logp"]), want_lp, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(out["teacher_logp"]), want_tlp, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(out["entropy"]), want_ent, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(out["jsd"]), want_jsd, rtol=1e-3, atol=1e-5)

    # gradient through the checkpointed chunks equals the gradient through full logits
    def chunked(p):
        h = forward_hidden(sc, p, ids, am)
        return jnp.sum(
            dv.chunked_token_stats(lambda x: lm_logits(sc, p, x), h, ids, chunk=4)["logp"]
        )

    def full(p):
        lp = jax.nn.log_softmax(forward(sc, p, ids, am), -1)
        return jnp.sum(jnp.take_along_axis(lp[:, :-1], ids[:, 1:, None], -1))

    g1, g2 = jax.jit(lambda p: (jax.grad(chunked)(p), jax.grad(full)(p)))(sp)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Rewards, gates, presets, config
# ------------------------------------------------------------------------------------------
def test_token_rewards_match_the_unified_formula():
    b, t = 4, 8
    m = _masks(b, t, RNG)
    ls, lt, lr = (RNG.normal(-2, 1, (b, t)).astype(np.float32) for _ in range(3))
    R = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
    last = np.zeros((b, t), np.float32)
    for i in range(b):
        last[i, np.nonzero(m[i])[0][-1]] = 1
    for name, kw in [("dgpo", {}), ("ppo", {}), ("exopd", {"lam": 1.25}), ("opd", {})]:
        cfg = presets.get_objective(name, **kw)
        u = np.asarray(trajectory_gate(cfg, jnp.asarray(R), b))
        got, gate = token_rewards(
            cfg,
            jnp.asarray(m),
            jnp.asarray(R),
            jnp.asarray(u),
            jnp.asarray(ls),
            jnp.asarray(lt),
            jnp.asarray(lr),
        )
        lam = cfg.teacher_lambda
        want = (
            cfg.outcome_reward_coef * R[:, None] * last
            + cfg.token_reward_coef * u[:, None] * (lam * (lt - lr) - (ls - lr)) * m
        )
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(gate), m)
        if name == "dgpo":
            np.testing.assert_array_equal(u, 1.0 - R)  # KL only on wrong answers
    # TrOPD: outliers (p_T < p_S) gated off for the policy term
    cfg = presets.get_objective("tropd")
    _, gate = token_rewards(cfg, jnp.asarray(m), None, None, jnp.asarray(ls), jnp.asarray(lt))
    np.testing.assert_array_equal(np.asarray(gate), m * (lt >= ls))
    cfg = presets.get_objective("tropd", outlier_handling="clip")
    got, gate = token_rewards(cfg, jnp.asarray(m), None, None, jnp.asarray(ls), jnp.asarray(lt))
    np.testing.assert_allclose(
        np.asarray(got), np.where(lt >= ls, lt - ls, np.maximum(lt - ls, -1.0)) * m, rtol=1e-6
    )


def test_every_preset_builds_and_bad_knobs_are_named():
    for name in presets.OBJECTIVE_PRESETS:
        cfg = presets.get_objective(name)
        assert cfg.name == name
    assert presets.get_objective("dgpo", kl_placement="loss").kl_loss_target == "teacher"
    assert presets.get_objective("exopd").teacher_lambda == 1.25
    assert presets.get_objective("gkd").jsd_beta == 0.1
    with pytest.raises(ValueError, match="unknown objective preset 'dgpo2'"):
        presets.get_objective("dgpo2")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['betta'\]"):
        presets.get_objective("dgpo", betta=0.1)
    with pytest.raises(ValueError, match=r"unknown objective knob\(s\) \['clip_eps'\]"):
        presets.get_objective("ppo").replace(clip_eps=0.3)
    with pytest.raises(ValueError, match="advantage='gae' needs a critic"):
        presets.get_objective("ppo", critic="none")
    with pytest.raises(ValueError, match="advantage='grpo' normalises outcome rewards only"):
        presets.get_objective("grpo", token_reward_coef=0.1)
    with pytest.raises(ValueError, match="advantage=.*not one of"):
        ObjectiveConfig(advantage="vtrace")
    with pytest.raises(ValueError, match="topk_fkl needs divergence_top_k"):
        presets.get_objective("tropd", top_k=0)
    with pytest.raises(ValueError, match="jsd_beta must be in"):
        presets.get_objective("gkd", beta=0.0)
    with pytest.raises(ValueError, match="reward_logprob_source='current' needs"):
        presets.get_objective("dgpo", reward_logprob_source="current")
    with pytest.raises(ValueError, match="divergence_gate='trajectory' needs a trajectory_gate"):
        presets.get_objective("kd", divergence_gate="trajectory")
    with pytest.raises(ValueError, match="kl_placement must be 'reward', 'loss' or 'divergence'"):
        presets.get_objective("dgpo", kl_placement="advantage")


def test_schedules_match_hand_formulas():
    p = schedules.teacher_turn_probability
    for shape in ("linear", "cosine", "exponential"):
        assert p(0, 100, 0.6, shape) == pytest.approx(0.6)
        assert p(100, 100, 0.6, shape) == pytest.approx(0.0, abs=1e-12)
        assert p(250, 100, 0.6, shape) == pytest.approx(0.0, abs=1e-12)
    assert p(25, 100, 0.6, "linear") == pytest.approx(0.45)
    assert p(50, 100, 0.6, "cosine") == pytest.approx(0.3)
    assert p(50, 100, 0.6, "exponential", 5.0) == pytest.approx(
        0.6 * (math.exp(-2.5) - math.exp(-5)) / (1 - math.exp(-5))
    )
    with pytest.raises(ValueError, match="unknown schedule"):
        p(1, 10, 0.5, "step")
    s = schedules.distillm_student_share
    assert s(0.0, 2.0, 2.05) == (0.0, 2.0)  # no rise: the reference point stays
    assert s(0.0, 2.0, 2.2) == (pytest.approx(0.1), 2.2)
    assert s(0.95, 2.0, 2.2) == (1.0, 2.2)
    d = schedules.distillm_data_source
    assert [d(r, 0.5, 0.0, 3, 10) for r in (0.1, 0.6)] == ["student", "teacher"]
    # buffer full: fresh with probability share * (1 - progress), else the buffer
    assert [d(r, 0.5, 0.5, 10, 10) for r in (0.2, 0.3, 0.6)] == ["student", "replay", "teacher"]
    t, mom = schedules.taid_update(0.4, 0.0, None, 2.0, progress=0.0)
    assert (t, mom) == (0.4, 0.0)  # the first call only records the loss
    t, mom = schedules.taid_update(0.4, 0.0, 2.0, 1.8, progress=0.1)
    want_m = 0.01 * (0.2 / 2.0)
    assert mom == pytest.approx(want_m)
    want_t = max(0.4 + 0.6 * 0.1, 0.4 + 5e-4 / (1 + math.exp(-want_m)) * 0.6)
    assert t == pytest.approx(want_t)
    t2, _ = schedules.taid_update(0.69999, 0.0, 1.0, 1.0, progress=1.0, t_end=0.7)
    assert t2 == 0.7  # capped at t_end


def test_optimizer_schedules():
    cfg = OptimConfig(
        lr=1e-3, critic_lr=1e-2, schedule="warmup_constant", warmup_steps=10, critic_warmup_steps=2
    )
    assert learning_rates(cfg, 0) == {"lr": 0.0, "critic_lr": 0.0}
    assert learning_rates(cfg, 5)["lr"] == pytest.approx(5e-4)
    assert learning_rates(cfg, 50) == pytest.approx({"lr": 1e-3, "critic_lr": 1e-2})
    cos = OptimConfig(lr=1e-4, schedule="cosine", total_steps=100, warmup_steps=0)
    for step in (0, 25, 50, 100):
        want = 1e-4 * 0.5 * (1 + math.cos(math.pi * step / 100))
        assert learning_rates(cos, step)["lr"] == pytest.approx(want, rel=1e-6, abs=1e-12)
    with pytest.raises(ValueError, match="cosine' needs total_steps"):
        OptimConfig(schedule="cosine")
