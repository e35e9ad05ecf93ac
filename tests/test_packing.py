"""Packing trajectories into rows (dgpo_jax.learner.packing): the round trip is exact, no
trajectory is split, every token's segment and trajectory ids are right, and on a Search-R1-like
length mix the padded positions stay within 15% of the real tokens; the KD cold start trains
the same on packed rows as on padded ones."""

import json

import jax
import numpy as np
import pytest

from dgpo_jax.config import base_config, build_objective
from dgpo_jax.data.synthetic import build_word_tokenizer, generate_world
from dgpo_jax.launch.coldstart import kd_train
from dgpo_jax.launch.context import RunContext
from dgpo_jax.learner.packing import (
    first_fit_decreasing,
    pack_for_update,
    pack_trajectories,
    pack_width,
)
from dgpo_jax.learner.update_step import split_micro


def _batch(lengths, prompt_lengths, t, seed=0):
    """An unpacked batch as score_rollout builds it: prompt left-padded to P, response
    right-padded, every field holding distinct values on real tokens and 0 on padding."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    p = max(prompt_lengths)
    mask = np.zeros((n, t), np.int32)
    for i, (total, prompt) in enumerate(zip(lengths, prompt_lengths, strict=True)):
        mask[i, p - prompt : p - prompt + total] = 1
    real = mask > 0
    return {
        "input_ids": np.where(real, rng.integers(1, 1000, (n, t)), 0).astype(np.int32),
        "attention_mask": mask,
        "loss_mask": np.where(real, rng.integers(0, 2, (n, t)), 0).astype(np.float32),
        "sampler_logprobs": np.where(real, -rng.random((n, t)), 0).astype(np.float32),
        "rewards": rng.random(n).astype(np.float32),
        "group_ids": np.arange(n, dtype=np.int32) // 2,
        "taid_t": np.float32(0.3),
    }


def _small():
    lengths = [5, 17, 3, 9, 12, 1, 0, 20, 7]
    prompts = [3, 4, 2, 5, 6, 1, 0, 4, 3]
    return _batch(lengths, prompts, t=32), np.array(lengths)


def test_unpack_of_pack_is_the_identity_for_every_field():
    batch, lengths = _small()
    packed, layout = pack_trajectories(batch, width=24, rows_multiple=4)
    assert packed["input_ids"].shape == (layout.rows, 24) and layout.rows % 4 == 0
    for k, v in batch.items():
        if np.ndim(v) == 2:
            np.testing.assert_array_equal(layout.unpack(packed[k]), v, err_msg=k)
            assert packed[k].dtype == v.dtype
        else:  # per-trajectory fields and scalars are untouched
            np.testing.assert_array_equal(packed[k], v)
    # pack() of an unpacked array is the packed field
    np.testing.assert_array_equal(layout.pack(batch["loss_mask"]), packed["loss_mask"])
    # attention_mask = segment_ids > 0
    np.testing.assert_array_equal(packed["attention_mask"], packed["segment_ids"] > 0)
    assert layout.stats["real_tokens"] == lengths.sum()
    assert layout.stats["padded_positions"] == layout.rows * 24 - lengths.sum()


def test_every_token_knows_its_segment_and_trajectory_and_none_is_split():
    batch, lengths = _small()
    packed, _ = pack_trajectories(batch, width=24)
    seg, traj = packed["segment_ids"], packed["traj_index"]
    assert seg.dtype == traj.dtype == np.int32
    np.testing.assert_array_equal(traj < 0, seg == 0)
    rows_of = {}
    for r in range(len(seg)):
        segs = seg[r][seg[r] > 0]
        # segments numbered 1, 2, ... in order, each contiguous
        assert list(dict.fromkeys(segs)) == list(range(1, len(set(segs)) + 1))
        for s in set(segs):
            cols = np.flatnonzero(seg[r] == s)
            assert cols[-1] - cols[0] + 1 == len(cols)
            (i,) = set(traj[r, cols])  # one trajectory per segment
            assert i not in rows_of, f"trajectory {i} split across rows"
            rows_of[i] = r
            # the segment is the trajectory's real tokens, in order
            real = batch["attention_mask"][i] > 0
            np.testing.assert_array_equal(packed["input_ids"][r, cols], batch["input_ids"][i][real])
            assert len(cols) == lengths[i]
    assert sorted(rows_of) == [i for i in range(len(lengths)) if lengths[i] > 0]


def test_first_fit_decreasing_by_hand():
    # decreasing: 8 -> row 0, 6 -> row 1, 5 -> row 2, 4 -> row 1 (6 + 4), the first 2 -> row 0
    # (8 + 2), the second 2 -> row 2 (5 + 2), 1 -> row 2 (rows 0 and 1 are full)
    assert first_fit_decreasing([2, 8, 5, 6, 4, 2, 1], 10) == [[1, 0], [3, 4], [2, 5, 6]]
    with pytest.raises(ValueError, match="trajectory 1 has 11 real tokens, more than the packed"):
        first_fit_decreasing([3, 11], 10)


def test_widths_rows_and_bad_input():
    assert pack_width([1, 64]) == 64 and pack_width([65, 3]) == 128 and pack_width([0]) == 64
    batch, _ = _small()
    packed, _ = pack_trajectories(batch, width=24)
    with pytest.raises(ValueError, match="packed already"):
        pack_trajectories(packed, width=24)
    with pytest.raises(ValueError, match=r"batch\['rewards'\] has shape \(3,\)"):
        pack_trajectories(dict(batch, rewards=np.zeros(3)), width=24)
    with pytest.raises(ValueError, match="trajectory 1 has 17 real tokens"):
        pack_trajectories(batch, width=16)
    with pytest.raises(ValueError, match="need 4 packed rows of width 24, more than the 2 rows"):
        pack_for_update(batch, width=24, rows=2, micro_batches=1)
    with pytest.raises(ValueError, match="rows 9 is not a multiple of micro_batches 2"):
        pack_for_update(batch, width=24, rows=9, micro_batches=2)


def test_fixed_shape_fills_the_first_micro_batches():
    """9 trajectories (8 non-empty) into 12 rows of 24 in 3 micro-batches of 4 rows. First-fit
    decreasing by hand: 20 -> row 0, 17 -> row 1, 12 -> row 2, 9 -> row 2, 7 -> row 1, 5 -> row
    3 (no room elsewhere), 3 -> row 0, 1 -> row 0: 4 bins, which micro-batch 0 (rows 0, 3, 6, 9
    as update_step.split_micro takes them) holds; micro-batches 1 and 2 are empty."""
    batch, lengths = _small()
    packed, layout = pack_for_update(batch, width=24, rows=12, micro_batches=3)
    assert packed["input_ids"].shape == (12, 24)
    assert first_fit_decreasing(lengths, 24) == [[7, 2, 5], [1, 8], [4, 3], [0]]
    per_micro_real = np.asarray(split_micro(packed["attention_mask"], 3)).sum(axis=(1, 2))
    assert per_micro_real.tolist() == [lengths.sum(), 0, 0]
    stats = layout.stats
    assert (stats["busy_micro_batches"], stats["micro_batches"]) == (1, 3)
    assert stats["computed_positions"] == 4 * 24  # one micro-batch of 4 rows is computed
    assert stats["padded_positions"] == 4 * 24 - lengths.sum()
    for k, v in batch.items():
        if np.ndim(v) == 2:
            np.testing.assert_array_equal(layout.unpack(packed[k]), v, err_msg=k)
    # per-trajectory fields extended to the rows (the compiled shape) with entries no token
    # reads: reward 0, a group of its own each
    np.testing.assert_array_equal(packed["rewards"], np.r_[batch["rewards"], np.zeros(3)])
    np.testing.assert_array_equal(packed["group_ids"], np.r_[batch["group_ids"], [5, 6, 7]])
    assert packed["traj_index"].max() == len(lengths) - 1


def _search_r1_lengths(n, rng):
    """Rollout lengths like Search-R1's: a prompt of ~150-400 tokens plus turns and retrieved
    documents, most between ~200 and ~2000 tokens with a long right tail (lognormal), at most the
    8704-position context."""
    return np.clip(rng.lognormal(np.log(700), 0.55, n), 200, 8704).astype(np.int64)


@pytest.mark.parametrize("n, per_micro", [(512, 4), (256, 4), (256, 2)])
def test_padding_on_a_realistic_length_mix(n, per_micro):
    """N trajectories into N rows of the 8704-position context (the run's one shape), micro-
    batches of ``per_micro`` rows: the positions of the micro-batches that hold a real token
    exceed the real tokens by at most 15%."""
    rng = np.random.default_rng(n)
    lengths = _search_r1_lengths(n, rng)
    prompts = np.minimum(rng.integers(150, 400, n), lengths)
    batch = _batch(lengths, prompts, t=8704, seed=1)
    packed, layout = pack_for_update(batch, 8704, rows=n, micro_batches=n // per_micro)
    stats = layout.stats
    assert stats["real_tokens"] == lengths.sum()
    assert stats["padded_positions_per_real_token"] <= 0.15, stats
    # one trajectory per row, padded to the longest: several times the real tokens
    assert stats["padded_to_longest_per_real_token"] >= 1.5, stats
    np.testing.assert_array_equal(layout.unpack(packed["input_ids"]), batch["input_ids"])


def test_the_cold_start_trains_the_same_on_packed_rows(tmp_path):
    """kd_train (the KD cold start) on packed rows: the losses, gradient norms and weights of
    the padded run, up to float summation order."""
    build_word_tokenizer(generate_world(seed=0, num_entities=20), tmp_path / "tok")
    rng = np.random.default_rng(0)
    n, t = 8, 64
    lengths = rng.integers(10, 40, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    seqs = {
        "input_ids": (rng.integers(3, 60, (n, t)) * mask).astype(np.int32),
        "attention_mask": mask,
        "loss_mask": ((np.arange(t)[None] >= 6) & (mask > 0)).astype(np.float32),
    }
    runs = {}
    for pack in (False, True):
        cfg = base_config()
        cfg.mode, cfg.workdir = "coldstart", str(tmp_path / f"pack{pack}")
        cfg.model.student, cfg.model.teacher = "preset:tiny", "preset:tiny-teacher"
        cfg.model.tokenizer, cfg.model.dtype = str(tmp_path / "tok"), "float32"
        cfg.objective.preset = "dgpo_coldstart"
        cfg.data.train_files = __file__  # validate() wants a file; nothing reads it here
        cfg.retrieval.kind = "http"  # a client only; nothing is retrieved
        cfg.mesh.num_devices = 1
        cfg.train.pack, cfg.train.micro_batch_size = pack, 2
        cfg.logging.progress = cfg.logging.tensorboard = False
        run = RunContext(cfg, need_teacher=True)
        state = kd_train(cfg, run, seqs, 1, 1e-3, 4, objective=build_objective(cfg))
        with open(tmp_path / f"pack{pack}" / "coldstart_metrics.jsonl") as f:
            metrics = [json.loads(line) for line in f]
        runs[pack] = (metrics, jax.tree.leaves(state.params["policy"]))
    (padded, w_padded), (packed, w_packed) = runs[False], runs[True]
    assert len(padded) == len(packed) == 2
    for a, b in zip(padded, packed, strict=True):
        assert a["num_tokens"] == b["num_tokens"]
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
        # 4 sequences of 10-39 tokens in rows of 64: packing leaves fewer padded positions
        assert b["padded_positions_per_real_token"] < a["padded_positions_per_real_token"]
    for x, y in zip(w_padded, w_packed, strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)
