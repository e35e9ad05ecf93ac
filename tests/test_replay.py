"""DistiLLM's replay buffer: rows survive add -> sample and save -> load exactly, first in first
out, sampling without replacement."""

import numpy as np
import pytest

from dgpo_jax.curricula.replay import ReplayBuffer


def _batch(b, t, offset):
    ids = np.arange(offset, offset + b * t, dtype=np.int32).reshape(b, t)
    am = np.ones((b, t), np.int32)
    am[:, :2] = 0  # left-padded prompts
    for i in range(b):
        am[i, t - i :] = 0  # row i has i right-padding positions
    return {
        "input_ids": ids * am,
        "attention_mask": am,
        "loss_mask": (am * (np.arange(t) >= 4)).astype(np.float32),
        "rewards": np.arange(b, dtype=np.float32) + offset,
        "taid_t": np.float32(0.5),
    }


def _rows(batch):
    """Each row as (ids, am, lm up to its last attended position, reward)."""
    out = []
    for i in range(len(batch["input_ids"])):
        w = int(np.flatnonzero(batch["attention_mask"][i])[-1]) + 1
        out.append(
            (
                tuple(batch["input_ids"][i, :w]),
                tuple(batch["attention_mask"][i, :w]),
                tuple(batch["loss_mask"][i, :w]),
                float(batch["rewards"][i]),
            )
        )
    return out


def test_add_sample_roundtrip_and_fifo(tmp_path):
    buf = ReplayBuffer(5)
    first, second = _batch(3, 8, 0), _batch(3, 10, 100)
    buf.add(first)
    buf.add(second)
    assert len(buf) == 5  # the oldest row of `first` is gone
    kept = _rows(first)[1:] + _rows(second)
    drawn = buf.sample(5, np.random.default_rng(0))
    assert "taid_t" not in drawn and drawn["input_ids"].shape == (5, 10)
    assert sorted(_rows(drawn)) == sorted(kept)  # every row once: no replacement
    # right padding is zeros in every field
    for i in range(5):
        w = int(np.flatnonzero(drawn["attention_mask"][i])[-1]) + 1
        assert not drawn["input_ids"][i, w:].any() and not drawn["loss_mask"][i, w:].any()
    assert len(_rows(buf.sample(2, np.random.default_rng(1)))) == 2
    path = str(tmp_path / "r.npz")
    buf.save(path)
    back = ReplayBuffer.load(path)
    assert back.capacity == 5 and len(back) == 5
    assert _rows(back.sample(5, np.random.default_rng(0))) == _rows(drawn)  # same order too
    empty = str(tmp_path / "e.npz")
    ReplayBuffer(3).save(empty)
    assert len(ReplayBuffer.load(empty)) == 0
    with pytest.raises(ValueError, match="empty replay buffer"):
        ReplayBuffer(3).sample(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="capacity must be an int >= 1, got 0"):
        ReplayBuffer(0)
