"""DistiLLM's replay buffer: rows survive add -> sample and save -> load exactly, first in first
out, sampling without replacement; saved next to checkpoints on a local disk or an object
store."""

import numpy as np
import pytest
from etils import epath

from dgpo_jax.curricula.replay import (
    ReplayBuffer,
    load_for_checkpoint,
    replay_path,
    save_with_checkpoint,
)
from tests.test_fileio import assert_no_local_files, use_fake_gcs


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


@pytest.mark.parametrize("where", ["local", "object_store"])
def test_save_with_checkpoint_prunes_and_loads_back(where, monkeypatch, tmp_path):
    """Through epath: a local directory or a ``gs://`` one (in-memory fake, no local files)."""
    root = str(tmp_path) if where == "local" else use_fake_gcs(monkeypatch, tmp_path)
    replay_dir = f"{root}/replay"
    buf = ReplayBuffer(4)
    buf.add(_batch(3, 8, 0))
    for step in (2, 4, 6):
        save_with_checkpoint(buf, replay_dir, step, kept_steps=[step - 2])
    names = sorted(p.name for p in epath.Path(replay_dir).iterdir())
    assert names == ["replay_4.npz", "replay_6.npz"]  # step 2's checkpoint is no longer kept
    assert replay_path(replay_dir, 6) == f"{replay_dir}/replay_6.npz"
    back = load_for_checkpoint(replay_dir, 6)
    assert back.capacity == 4 and _rows(back.sample(3, np.random.default_rng(0))) == _rows(
        buf.sample(3, np.random.default_rng(0))
    )
    with pytest.raises(FileNotFoundError, match="checkpoint 8 has no replay buffer"):
        load_for_checkpoint(replay_dir, 8)
    # never unpickled: an object array in the file is refused
    with epath.Path(replay_path(replay_dir, 6)).open("wb") as handle:
        np.savez(handle, capacity=np.int64(4), count=np.int64(1), widths=np.array([object()]))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_for_checkpoint(replay_dir, 6)
    if where == "object_store":
        assert_no_local_files(tmp_path)
