"""The scoring pass (dgpo_jax.learner.scoring.sequence_logprobs) against transformers: each
trajectory scored alone in PyTorch equals its row of a left-padded batch and its segment of a
packed batch, micro-batched (with padding rows) or not."""

import numpy as np
import pytest
import torch

from dgpo_jax.learner.packing import pack_trajectories
from dgpo_jax.learner.scoring import sequence_logprobs
from dgpo_jax.models import load_hf
from tests.conftest import make_hf_model

LENGTHS = [7, 13, 4, 10, 9]
T = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("scoring_model")
    hf = make_hf_model(path, seed=3)
    config, params = load_hf(str(path), dtype="float32")
    return config, params, hf


@pytest.fixture(scope="module")
def trajectories(model):
    """Token ids of each trajectory and its log-probs under transformers, scored alone."""
    _, _, hf = model
    rng = np.random.default_rng(0)
    out = []
    for n in LENGTHS:
        ids = rng.integers(0, 256, n)
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor(ids[None])).logits[0].double()
        logp = torch.log_softmax(logits, -1).numpy()
        ref = np.zeros(n)
        ref[1:] = logp[np.arange(n - 1), ids[1:]]
        out.append((ids, ref))
    return out


def _left_padded(trajectories):
    ids = np.zeros((len(trajectories), T), np.int32)
    mask = np.zeros((len(trajectories), T), np.int32)
    for i, (tok, _) in enumerate(trajectories):
        ids[i, T - len(tok) :] = tok
        mask[i, T - len(tok) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _check(unpacked_logp, trajectories, atol=2e-5):
    for i, (tok, ref) in enumerate(trajectories):
        got = np.asarray(unpacked_logp)[i, T - len(tok) :]
        # the first token has no context; the rest equal transformers on the trajectory alone
        np.testing.assert_allclose(got[1:], ref[1:], atol=atol, err_msg=f"trajectory {i}")


def test_left_padded_rows_micro_batched_equal_each_trajectory_alone(model, trajectories):
    config, params, _ = model
    batch = _left_padded(trajectories)
    whole = sequence_logprobs(config, params, batch["input_ids"], batch["attention_mask"], chunk=8)
    _check(whole, trajectories)
    # 5 rows in micro-batches of 2: one padding row, dropped
    micro = sequence_logprobs(
        config, params, batch["input_ids"], batch["attention_mask"], chunk=8, micro_batch=2
    )
    assert micro.shape == (5, T)
    np.testing.assert_allclose(np.asarray(micro), np.asarray(whole), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(micro)[:, 0], 0.0)


def test_packed_segments_equal_each_trajectory_alone(model, trajectories):
    config, params, _ = model
    packed, layout = pack_trajectories(_left_padded(trajectories), width=24, rows_multiple=2)
    assert layout.rows < len(LENGTHS)  # several trajectories share a row
    logp = sequence_logprobs(
        config,
        params,
        packed["input_ids"],
        packed["attention_mask"],
        chunk=8,
        segment_ids=packed["segment_ids"],
        micro_batch=1,
    )
    logp = np.asarray(logp)
    seg = packed["segment_ids"]
    starts = (seg > 0) & (seg != np.pad(seg, ((0, 0), (1, 0)))[:, :-1])
    # every segment's first token, and padding, hold 0
    np.testing.assert_array_equal(logp[starts | (seg == 0)], 0.0)
    _check(layout.unpack(logp), trajectories)


def test_bad_micro_batch_is_named(model):
    config, params, _ = model
    ids = np.zeros((3, 4), np.int32)
    with pytest.raises(ValueError, match="micro_batch must be >= 1 or None, got 0"):
        sequence_logprobs(config, params, ids, np.ones_like(ids), micro_batch=0)
