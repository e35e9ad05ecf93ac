"""This project against straight NumPy ports of the reference implementations' functions.

Each ``ref_*`` function below is written from the reference code named in its docstring (the
public veRL fork of omron-sinicx/dgpo and PeterGriffinJin/Search-R1, RUCBM/G-OPD, SakanaAI/TAID,
jongwooko/distillm), loop for loop, independently of this project's code; the tests compare the
two on random batches.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict

import jax.numpy as jnp
import numpy as np
import pytest

from dgpo_jax.curricula import schedules
from dgpo_jax.evaluation.metrics import exact_match
from dgpo_jax.objectives import advantages as adv
from dgpo_jax.objectives.presets import get_objective
from dgpo_jax.objectives.rewards import token_rewards, trajectory_gate


# ------------------------------------------------------------------------- reference ports ---
def ref_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def ref_masked_whiten(values, mask, shift_mean=True):
    """veRL ``verl/utils/torch_functional.py``: masked_mean, masked_var (unbiased), whiten."""
    mean = ref_masked_mean(values, mask)
    var = ref_masked_mean((values - mean) ** 2, mask)
    n = mask.sum()
    var = var * n / (n - 1)
    out = (values - mean) / np.sqrt(var + 1e-8)
    return out if shift_mean else out + mean


def ref_gae_recursion(token_level_rewards, values, gamma, lam):
    """veRL ``verl/trainer/ppo/core_algos.py`` compute_gae_advantage_return, the loop."""
    lastgaelam = 0.0
    reversed_adv = []
    gen_len = token_level_rewards.shape[-1]
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    return np.stack(reversed_adv[::-1], axis=1)


def ref_compute_gae_advantage_return(token_level_rewards, values, eos_mask, gamma, lam):
    """veRL compute_gae_advantage_return: the loop, returns, whitening over ``eos_mask``."""
    advantages = ref_gae_recursion(token_level_rewards, values, gamma, lam)
    returns = advantages + values
    return ref_masked_whiten(advantages, eos_mask), returns


def ref_compute_grpo_outcome_advantage(token_level_rewards, eos_mask, index, epsilon=1e-6):
    """veRL ``core_algos.py`` compute_grpo_outcome_advantage (torch.std is unbiased)."""
    scores = (token_level_rewards * (token_level_rewards != 0)).sum(-1)
    id2score = defaultdict(list)
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    id2mean, id2std = {}, {}
    for idx, group in id2score.items():
        if len(group) == 1:
            id2mean[idx], id2std[idx] = 0.0, 1.0
        else:
            id2mean[idx], id2std[idx] = np.mean(group), np.std(group, ddof=1)
    out = np.array(
        [(scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon) for i in range(len(scores))]
    )
    return out[:, None] * eos_mask


def ref_dgpo_token_level_rewards(
    token_level_scores, old_log_probs, teacher_log_prob, response_mask, beta
):
    """omron-sinicx/dgpo ``verl/trainer/ppo/ray_trainer.py``: create_reward_based_mask (a row
    is wrong when every token score is < 0.1) and apply_kl_penalty with kl_penalty='kl' (k1,
    ``old_log_probs - ref_log_prob``, the teacher loaded as the reference policy)."""
    reward_mask = (token_level_scores < 0.1).all(axis=1).astype(np.float64)[:, None]
    kld = (old_log_probs - teacher_log_prob) * response_mask * reward_mask
    return token_level_scores - beta * kld


def ref_gopd_advantages(old_log_prob, teacher_log_prob, base_log_prob, lam):
    """RUCBM/G-OPD ``verl/verl/workers/actor/dp_actor.py``: the per-token advantage
    ``-[(l^old - l^base) - lam (l^T - l^base)]`` (``-(l^old - l^T)`` for lam = 1)."""
    return -((old_log_prob - base_log_prob) - lam * (teacher_log_prob - base_log_prob))


def ref_normalize_answer(s):
    """Search-R1 ``verl/utils/reward_score/qa_em.py``."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def ref_em_check(prediction, golden_answers):
    """Search-R1 ``qa_em.py`` em_check."""
    if isinstance(golden_answers, str):
        golden_answers = [golden_answers]
    pred = ref_normalize_answer(prediction)
    return int(any(ref_normalize_answer(g) == pred for g in golden_answers))


class RefTAID:
    """SakanaAI/TAID ``src/distil_losses/taid.py`` update_t (t, prev_loss, momentum buffers)."""

    def __init__(self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t, self.prev_loss, self.momentum = t_start, math.inf, 0.0

    def update_t(self, loss, global_step, num_train_steps):
        if math.isinf(self.prev_loss):
            self.prev_loss = loss
            return
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * relative_change
        adaptive_delta = 1 / (1 + math.exp(-self.momentum))
        t_target = self.t_start + (self.t_end - self.t_start) * global_step / num_train_steps
        delta_t = self.alpha * adaptive_delta * (1 - self.t)
        self.t = min(self.t_end, max(t_target, self.t + delta_t))
        self.prev_loss = loss


def ref_distillm_threshold(threshold, prev_avg_loss, curr_avg_loss, loss_eps):
    """jongwooko/distillm ``finetune.py``: after a validation, the student-data threshold rises
    by 0.1 (capped at 1) when ``curr >= prev + loss_eps``, and only then does prev move."""
    if curr_avg_loss >= prev_avg_loss + loss_eps:
        threshold = min(threshold + 0.1, 1.0)
        prev_avg_loss = curr_avg_loss
    return threshold, prev_avg_loss


# ---------------------------------------------------------------------------------- tests ---
def _response_batch(rng, b=6, t=12):
    lengths = rng.integers(2, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
    return mask


@pytest.mark.parametrize("seed", range(3))
def test_gae_and_whitening_equal_verl_over_the_response(seed):
    """With the reference's mask (every response token) the project's GAE and masked whitening
    are veRL's, over the whole batch."""
    rng = np.random.default_rng(seed)
    mask = _response_batch(rng)
    values = rng.normal(size=mask.shape) * mask  # veRL's critic values are zero past the end
    rewards = rng.normal(size=mask.shape) * mask
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95)):
        want_adv, want_ret = ref_compute_gae_advantage_return(rewards, values, mask, gamma, lam)
        got_adv, got_ret = adv.gae_advantages(
            jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam
        )
        got_white = adv.masked_whiten(got_adv, jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(got_white), want_adv * mask, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(got_ret), want_ret * mask, rtol=1e-5, atol=1e-5)


def test_gae_over_student_tokens_equals_verl_on_the_compacted_rows():
    """With observation tokens masked out, the project's GAE equals veRL's on each row with the
    observations removed (they are not steps of the MDP)."""
    rng = np.random.default_rng(3)
    b, t = 5, 14
    mask = (rng.random((b, t)) < 0.6).astype(np.float64)
    mask[:, 0] = 1
    values = rng.normal(size=(b, t))
    rewards = rng.normal(size=(b, t)) * mask
    got, _ = adv.gae_advantages(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.97, 0.9
    )
    for i in range(b):
        keep = mask[i] > 0
        want = ref_gae_recursion(rewards[i][keep][None], values[i][keep][None], 0.97, 0.9)[0]
        np.testing.assert_allclose(np.asarray(got)[i][keep], want, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(got)[i][~keep] == 0)


@pytest.mark.parametrize("seed", range(3))
def test_grpo_advantage_equals_verl(seed):
    rng = np.random.default_rng(seed)
    groups = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # a group of one gets mean 0, std 1
    b = len(groups)
    mask = _response_batch(rng, b=b, t=9)
    outcome = rng.integers(0, 2, size=b).astype(np.float64)
    outcome[6:] = 1.0  # a group whose rewards are all equal: std 0
    last = np.zeros_like(mask)
    last[np.arange(b), mask.sum(1).astype(int) - 1] = 1
    want = ref_compute_grpo_outcome_advantage(outcome[:, None] * last, mask, groups)
    got = adv.grpo_advantages(jnp.asarray(outcome), jnp.asarray(groups), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_dgpo_token_rewards_equal_apply_kl_penalty_with_the_reward_mask(seed):
    rng = np.random.default_rng(seed)
    mask = _response_batch(rng, b=8)
    em = rng.integers(0, 2, size=8).astype(np.float64)
    last = np.zeros_like(mask)
    last[np.arange(8), mask.sum(1).astype(int) - 1] = 1
    scores = em[:, None] * last
    old, teacher = rng.normal(-2, 1, mask.shape), rng.normal(-2, 1, mask.shape)
    beta = 0.001
    want = ref_dgpo_token_level_rewards(scores, old, teacher, mask, beta) * mask
    cfg = get_objective("dgpo", beta=beta)
    gate = trajectory_gate(cfg, jnp.asarray(em), 8)
    got, _ = token_rewards(
        cfg, jnp.asarray(mask), jnp.asarray(em), gate, jnp.asarray(old), jnp.asarray(teacher), None
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lam", [1.0, 1.25, 0.5])
def test_gopd_advantage_equals_the_reference(lam):
    rng = np.random.default_rng(int(lam * 100))
    mask = _response_batch(rng)
    old, teacher, base = (rng.normal(-2, 1, mask.shape) for _ in range(3))
    cfg = get_objective("exopd", lam=lam)
    got, _ = token_rewards(
        cfg,
        jnp.asarray(mask),
        None,
        jnp.ones(mask.shape[0]),
        jnp.asarray(old),
        jnp.asarray(teacher),
        jnp.asarray(base),
    )
    want = ref_gopd_advantages(old, teacher, base, lam) * mask
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


TRICKY = [
    ("The Beatles", ["Beatles"]),
    ("the beatles.", ["The Beatles"]),
    ("An apple a day", ["apple day"]),
    ("U.S.A.", ["USA"]),
    ("  New   York  ", ["new york"]),
    ("Théâtre du Soleil", ["theatre du soleil"]),  # accents are not folded
    ("Théâtre du Soleil", ["théâtre du soleil"]),
    ("1,000", ["1000"]),
    ("rock-and-roll", ["rock and roll"]),
    ("rock-and-roll", ["rockandroll"]),
    ("Paris", ["London", "paris, france", "Paris"]),
    ("Paris", ["London", "Paris, France"]),
    ("“quoted”", ["quoted"]),  # unicode quotes are not ASCII punctuation
    ("a", ["an"]),
    ("", [""]),
    ("theatre", ["the atre"]),
]


@pytest.mark.parametrize("prediction, golds", TRICKY)
def test_exact_match_equals_search_r1_em_check(prediction, golds):
    assert exact_match(prediction, golds) == ref_em_check(prediction, golds)


def test_taid_t_follows_the_reference_update():
    """t over 40 steps of a noisy, mostly falling loss: the first call only records the loss,
    t never passes t_end, and the linear target uses the 0-based step."""
    rng = np.random.default_rng(0)
    losses = 3.0 * np.exp(-np.arange(40) / 15) + rng.normal(0, 0.05, 40)
    for t_end, alpha in ((1.0, 5e-4), (0.7, 0.2)):
        ref = RefTAID(t_end=t_end, alpha=alpha)
        t, m, prev = 0.4, 0.0, None
        for step, loss in enumerate(losses):
            ref.update_t(float(loss), step, 40)
            t, m = schedules.taid_update(
                t, m, prev, float(loss), step / 40, t_start=0.4, t_end=t_end, alpha=alpha, beta=0.99
            )
            prev = float(loss)
            assert t == pytest.approx(ref.t, abs=1e-12), step
            assert m == pytest.approx(ref.momentum, abs=1e-12), step
        assert ref.t <= t_end


def test_distillm_share_follows_the_reference_rule():
    """The comparison point moves only when the share rises; a rise of exactly eps counts."""
    rng = np.random.default_rng(1)
    val = 2.0 + np.cumsum(rng.normal(0.02, 0.08, 30))
    val[5] = val[4] + 0.1  # exactly eps above the previous validation
    share, ref_loss = 0.0, 2.0
    want_share, want_prev = 0.0, 2.0
    for v in val:
        want_share, want_prev = ref_distillm_threshold(want_share, want_prev, float(v), 0.1)
        share, ref_loss = schedules.distillm_student_share(share, ref_loss, float(v), 0.1, 0.1)
        assert (share, ref_loss) == pytest.approx((want_share, want_prev), abs=1e-12)
    assert 0 < share <= 1
