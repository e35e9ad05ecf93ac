"""Tests for dgpo_jax.learner.train_state and dgpo_jax.checkpoint.

References: values are compared bit-exactly with NumPy copies taken before saving (and the
Adam moments with the hand-derived AdamW recurrence); restored shardings are compared with the
shardings that were asked for. Atomicity is tested by SIGKILLing a real writer process while it
saves a 32 MB state, at the moment its temporary directory appears, while it prunes, and at
random moments, then checking that every listed step restores intact.

Run as a script (`python tests/test_checkpoint.py --writer DIR`), this file is that writer.
"""

from __future__ import annotations

import os

# 8 fake CPU devices; tests/conftest.py does the same. Must happen before jax is imported.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla_flags:
    os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_force_host_platform_device_count=8".strip()

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dgpo_jax.checkpoint.checkpointer import (  # noqa: E402
    Checkpointer,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    abstract_like,
)
from dgpo_jax.learner.train_state import TrainState, apply_gradients, create_train_state  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# ----- helpers -----


def make_mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * len(shape))


# Two params of the same shape with different specs: a shape-only lookup would mix them up.
PARAM_SPECS = {
    "embed": P("data", "fsdp"),
    "proj": P("fsdp", "data"),
    "bias": P("fsdp"),
    "scale": P(),
}


def make_params(mesh):
    rng = np.random.default_rng(0)
    values = {
        "embed": rng.standard_normal((8, 16), dtype=np.float32),
        "proj": rng.standard_normal((8, 16), dtype=np.float32),
        "bias": rng.standard_normal((16,), dtype=np.float32),
        "scale": np.float32(1.5) * np.ones((), np.float32),
    }
    return {k: jax.device_put(v, NamedSharding(mesh, PARAM_SPECS[k])) for k, v in values.items()}


def loss_fn(params, x):
    h = jnp.tanh(x @ params["embed"].T @ params["proj"] + params["bias"])
    return jnp.mean(h**2) * params["scale"]


ADAMW = dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)


@functools.cache
def trained_state(mesh_shape=(2, 4), num_updates=2):
    """A TrainState after `num_updates` real AdamW steps, and the grads of each step.

    Cached: jax arrays are immutable, so tests can share it.
    """
    tx = optax.adamw(**ADAMW)
    state = create_train_state(make_params(make_mesh(mesh_shape)), tx, jax.random.key(42))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16), dtype=np.float32))

    @jax.jit
    def train_step(state):
        grads = jax.grad(loss_fn)(state.params, x)
        return apply_gradients(state, grads, tx), grads

    grads_seen = []
    for _ in range(num_updates):
        state, grads = train_step(state)
        grads_seen.append(jax.tree.map(np.asarray, grads))
    return state, grads_seen


def to_numpy(tree):
    """Host copies; typed keys become (impl name, key data)."""

    def one(leaf):
        if isinstance(leaf, str):  # already converted
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return (str(jax.random.key_impl(leaf)), np.asarray(jax.random.key_data(leaf)))
        return np.asarray(leaf)

    return jax.tree.map(one, tree)


def assert_trees_bit_equal(actual, expected):
    flat_actual, tree_actual = jax.tree_util.tree_flatten_with_path(to_numpy(actual))
    flat_expected, tree_expected = jax.tree_util.tree_flatten_with_path(to_numpy(expected))
    assert tree_actual == tree_expected
    for (path, a), (_, e) in zip(flat_actual, flat_expected):
        if isinstance(a, str):
            assert a == e, path
        else:
            assert a.dtype == e.dtype and a.shape == e.shape, path
            a_bytes, e_bytes = np.atleast_1d(a).view(np.uint8), np.atleast_1d(e).view(np.uint8)
            np.testing.assert_array_equal(a_bytes, e_bytes, err_msg=str(path))


def assert_shardings_equal(restored, target):
    flat_restored = jax.tree_util.tree_flatten_with_path(restored)[0]
    flat_target = jax.tree.leaves(target)
    assert len(flat_restored) == len(flat_target)
    for (path, leaf), want in zip(flat_restored, flat_target):
        assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim), (path, leaf.sharding)
        if isinstance(want.sharding, NamedSharding):
            assert leaf.sharding.mesh.shape == want.sharding.mesh.shape
            assert leaf.sharding.spec == want.sharding.spec


# ----- train state -----


def test_opt_state_inherits_param_shardings():
    mesh = make_mesh((2, 4))
    params = make_params(mesh)
    state = create_train_state(params, optax.adamw(1e-3), jax.random.key(0))
    mirrored = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        names = [getattr(k, "name", getattr(k, "key", getattr(k, "idx", None))) for k in path]
        if names[-2] in ("mu", "nu"):
            param = params[names[-1]]
            assert leaf.shape == param.shape
            assert leaf.sharding == param.sharding, (names, leaf.sharding, param.sharding)
            mirrored += 1
        else:  # Adam's step count: replicated on the params' mesh
            assert leaf.sharding == NamedSharding(mesh, P()), names
    assert mirrored == 2 * len(params)
    assert state.step.sharding == NamedSharding(mesh, P()) and int(state.step) == 0
    assert state.rng.sharding == NamedSharding(mesh, P())
    # Params are passed through untouched.
    for name, leaf in state.params.items():
        assert leaf is params[name]


def test_create_train_state_accepts_raw_key_and_rejects_bad_key():
    mesh = make_mesh((2, 4))
    state = create_train_state(make_params(mesh), optax.sgd(0.1), jax.random.PRNGKey(7))
    assert jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.PRNGKey(7))
    with pytest.raises(ValueError, match="rng must be"):
        create_train_state(make_params(mesh), optax.sgd(0.1), jnp.zeros((3,), jnp.float32))


def test_adamw_moments_match_hand_derived_recurrence():
    """Makes sure the state we checkpoint below is a real, non-trivial AdamW state."""
    state, grads = trained_state((2, 4), num_updates=2)
    adam = state.opt_state[0]
    b1, b2 = ADAMW["b1"], ADAMW["b2"]
    for name in PARAM_SPECS:
        g1, g2 = grads[0][name].astype(np.float64), grads[1][name].astype(np.float64)
        mu_expected = b1 * (1 - b1) * g1 + (1 - b1) * g2
        nu_expected = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
        np.testing.assert_allclose(np.asarray(adam.mu[name]), mu_expected, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(np.asarray(adam.nu[name]), nu_expected, rtol=1e-5, atol=1e-12)
        assert np.any(np.asarray(adam.mu[name]) != 0)
    assert int(adam.count) == 2 and int(state.step) == 2


# ----- round trips -----


def test_round_trip_same_mesh_bit_exact(tmp_path):
    state, _ = trained_state((2, 4))
    expected = to_numpy(state)
    metadata = {
        "config": {"model": "qwen2.5-0.5b", "lr": 1e-2, "mesh": [2, 4]},
        "data_iterator": {"pos": 17},
    }
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(2, state, metadata)
        target = abstract_like(state)
        restored, restored_metadata = ckpt.restore(target=target)
    assert isinstance(restored, TrainState)
    assert_trees_bit_equal(restored, expected)
    assert_shardings_equal(restored, target)
    assert restored_metadata == metadata
    assert int(restored.step) == 2
    assert str(jax.random.key_impl(restored.rng)) == str(jax.random.key_impl(state.rng))


@pytest.mark.parametrize("new_shape", [(4, 2), (8, 1), (1, 8)])
def test_restore_onto_another_mesh(tmp_path, new_shape):
    state, _ = trained_state((2, 4))
    expected = to_numpy(state)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, state, {})
    new_mesh = make_mesh(new_shape)
    target = abstract_like(
        state, jax.tree.map(lambda x: NamedSharding(new_mesh, x.sharding.spec), state)
    )
    restored, _ = Checkpointer(tmp_path / "ckpt").restore(target=target)
    assert_trees_bit_equal(restored, expected)
    assert_shardings_equal(restored, target)
    assert restored.params["embed"].sharding.mesh.shape == dict(zip(("data", "fsdp"), new_shape))


def test_restore_with_different_partition_specs_and_single_device(tmp_path):
    state, _ = trained_state((2, 4))
    expected = to_numpy(state)
    Checkpointer(tmp_path / "ckpt").save(2, state, {})
    mesh = make_mesh((4, 2))
    # Transposed specs for matrices: each device now holds different slices than when saved.
    specs = jax.tree.map(
        lambda x: NamedSharding(mesh, P(*reversed(x.sharding.spec)) if x.ndim == 2 else P()), state
    )
    target = abstract_like(state, specs)
    restored, _ = Checkpointer(tmp_path / "ckpt").restore(target=target)
    assert_trees_bit_equal(restored, expected)
    assert_shardings_equal(restored, target)
    one_device = abstract_like(state, SingleDeviceSharding(jax.devices()[3]))
    restored, _ = Checkpointer(tmp_path / "ckpt").restore(target=one_device)
    assert_trees_bit_equal(restored, expected)
    assert_shardings_equal(restored, one_device)


def test_restore_with_concrete_target_uses_its_shardings(tmp_path):
    state, _ = trained_state((2, 4))
    expected = to_numpy(state)
    Checkpointer(tmp_path / "ckpt").save(5, state, {})
    fresh, _ = trained_state((8, 1), num_updates=0)  # different values, other mesh
    restored, _ = Checkpointer(tmp_path / "ckpt").restore(target=fresh)
    assert_trees_bit_equal(restored, expected)
    assert_shardings_equal(restored, fresh)


def test_restore_without_target_gives_nested_dicts_on_default_device(tmp_path):
    state, _ = trained_state((2, 4))
    Checkpointer(tmp_path / "ckpt").save(2, state, {})
    restored, metadata = Checkpointer(tmp_path / "ckpt").restore()
    assert metadata == {}
    assert set(restored) == {"step", "params", "opt_state", "rng"}
    np.testing.assert_array_equal(
        np.asarray(restored["params"]["proj"]), np.asarray(state.params["proj"])
    )
    nu_restored = restored["opt_state"][0]["nu"]["embed"]
    np.testing.assert_array_equal(
        np.asarray(nu_restored), np.asarray(state.opt_state[0].nu["embed"])
    )
    assert restored["opt_state"][1] is None  # optax EmptyState
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(state.rng)
    )
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == SingleDeviceSharding(jax.devices()[0])


def test_round_trip_of_other_dtypes(tmp_path):
    mesh = make_mesh((2, 4))
    rng = np.random.default_rng(3)
    values = {
        "bf16": rng.standard_normal((8, 4)).astype(jnp.bfloat16),
        "f16": rng.standard_normal((8,)).astype(np.float16),
        "i8": rng.integers(-128, 127, (2, 8), dtype=np.int8),
        "u32": rng.integers(0, 2**32 - 1, (8,), dtype=np.uint32),
        "bool": rng.random((4, 4)) > 0.5,
        "f32_special": np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.0], np.float32),
    }
    state = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in values.items()}
    Checkpointer(tmp_path).save(0, state, {})
    target = abstract_like(state, NamedSharding(make_mesh((8, 1)), P()))
    restored, _ = Checkpointer(tmp_path).restore(target=target)
    assert_trees_bit_equal(restored, values)
    assert_shardings_equal(restored, target)


def test_async_save_round_trip(tmp_path):
    state, _ = trained_state((2, 4))
    expected = to_numpy(state)
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=1, async_save=True)
    assert ckpt.save(1, state, {"a": 1})
    copy = jax.tree.map(lambda x: x.copy(), state)
    assert ckpt.save(2, copy, {"a": 2})
    for leaf in jax.tree.leaves(copy):  # as if donated: the background write must not need them
        leaf.delete()
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2"]
    restored, metadata = ckpt.restore(target=abstract_like(state))
    ckpt.close()
    assert_trees_bit_equal(restored, expected)
    assert metadata == {"a": 2}


# ----- step management -----


def small_state(value):
    return {"x": jnp.full((4,), value, jnp.float32)}


def test_max_to_keep_prunes_oldest(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    for step in range(1, 6):
        assert ckpt.save(step, small_state(step), {"step": step})
    assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]  # no trash or temporary dirs left
    for step in (4, 5):
        restored, metadata = ckpt.restore(step, target=abstract_like(small_state(0.0)))
        np.testing.assert_array_equal(np.asarray(restored["x"]), np.full((4,), step, np.float32))
        assert metadata == {"step": step}
    keep_all = Checkpointer(tmp_path / "all", max_to_keep=None)
    for step in range(4):
        keep_all.save(step, small_state(step), {})
    assert keep_all.all_steps() == [0, 1, 2, 3]


def test_save_interval_and_force(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=None, save_interval_steps=3)
    saved = [step for step in range(1, 8) if ckpt.save(step, small_state(step), {})]
    assert saved == [3, 6]
    assert ckpt.save(7, small_state(7), {}, force=True)
    assert ckpt.all_steps() == [3, 6, 7]


def test_saving_an_existing_step_is_refused(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, small_state(1.0), {})
    with pytest.raises(ValueError, match="step 3 already exists"):
        ckpt.save(3, small_state(2.0), {})
    with pytest.raises(ValueError, match="step 2 is not after the latest step 3"):
        ckpt.save(2, small_state(2.0), {})  # refused loudly, not skipped
    with pytest.raises(ValueError, match="non-negative int"):
        ckpt.save(-1, small_state(2.0), {})


# ----- metadata -----


def test_metadata_round_trip_and_read_alone(tmp_path):
    metadata = {
        "config": {"name": "dgpo", "lr": 3e-6, "layers": [1, 2, {"deep": None}], "flag": True},
        "data_iterator": {"epoch": 2, "order_seed": 2**62 + 1, "shard_positions": [0, 11, 23]},
        "unicode": "é 検索 🔎",
        "special": [float("inf"), -float("inf")],
        "empty": {"list": [], "dict": {}},
    }
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, small_state(1.0), metadata)
    ckpt.save(2, small_state(2.0), {"nan": float("nan")})
    reader = Checkpointer(tmp_path)
    assert reader.restore_metadata(1) == metadata
    assert math.isnan(reader.restore_metadata()["nan"])  # latest step
    # The metadata file is plain JSON on disk (readable without orbax).
    assert json.loads((tmp_path / "1" / "metadata" / "metadata").read_text()) == metadata
    # restore_metadata reads no arrays: it works with the array files gone.
    shutil.rmtree(tmp_path / "1" / "state")
    assert Checkpointer(tmp_path).restore_metadata(1) == metadata


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"mesh": (2, 4)}, "metadata['mesh'] is a tuple"),
        ({"by_layer": {3: "x"}}, "metadata['by_layer'] has a non-str dict key 3"),
        ({"loss": [np.float32(0.5)]}, "metadata['loss'][0] is a float32"),
        ({"obj": {1, 2}}, "metadata['obj'] is a set"),
    ],
)
def test_metadata_that_would_not_round_trip_is_rejected(tmp_path, bad, where):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match=__import__("re").escape(where)):
        ckpt.save(1, small_state(1.0), bad)
    assert ckpt.all_steps() == []


# ----- errors -----


def test_error_empty_or_missing_directory(tmp_path):
    for directory in (tmp_path / "does_not_exist", tmp_path):
        ckpt = Checkpointer(directory)
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint found in {directory}"):
            ckpt.restore()
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint found"):
            ckpt.restore_metadata()
    assert not (tmp_path / "does_not_exist").exists()  # reading creates nothing


def test_error_missing_step_lists_available(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=None)
    for step in (10, 20, 30):
        ckpt.save(step, small_state(step), {})
    missing = r"step 25 not found in .*available steps: \[10, 20, 30\]"
    with pytest.raises(CheckpointNotFoundError, match=missing):
        ckpt.restore(25, target=abstract_like(small_state(0.0)))
    with pytest.raises(CheckpointNotFoundError, match=r"available steps: \[10, 20, 30\]"):
        ckpt.restore_metadata(5)


def test_error_target_mismatch_names_key_and_shapes(tmp_path):
    state, _ = trained_state((2, 4), num_updates=1)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {})
    target = abstract_like(state)

    bias_32 = jax.ShapeDtypeStruct((32,), jnp.float32, sharding=target.params["bias"].sharding)
    wrong_shape = target.replace(params={**target.params, "bias": bias_32})
    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.restore(target=wrong_shape)
    message = str(info.value)
    assert "key 'params/bias' has shape (16,) in the checkpoint but (32,) in the target" in message
    assert "opt_state" not in message  # the opt state itself still matches

    renamed = target.replace(
        params={("w_in" if k == "embed" else k): v for k, v in target.params.items()}
    )
    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.restore(target=renamed)
    assert "key 'params/w_in' is in the target but not in the checkpoint" in str(info.value)
    assert "key 'params/embed' is in the checkpoint but not in the target" in str(info.value)

    wrong_dtype = target.replace(
        step=jax.ShapeDtypeStruct((), jnp.float32, sharding=target.step.sharding)
    )
    dtype_message = "key 'step' has dtype int32 in the checkpoint but float32 in the target"
    with pytest.raises(CheckpointMismatchError, match=dtype_message):
        ckpt.restore(target=wrong_dtype)

    with pytest.raises(ValueError, match="has no sharding"):
        ckpt.restore(target={"x": jax.ShapeDtypeStruct((4,), jnp.float32)})


def test_step_directory_without_commit_marker_is_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, small_state(1.0), {})
    shutil.copytree(tmp_path / "1", tmp_path / "2")
    (tmp_path / "2" / "commit_success.txt").unlink()  # as if copied only in part
    reader = Checkpointer(tmp_path)
    assert reader.all_steps() == [1] and reader.latest_step() == 1
    with pytest.raises(
        CheckpointNotFoundError, match=r"step 2 is incomplete .*available steps: \[1\]"
    ):
        reader.restore(2)


# ----- atomicity under SIGKILL -----

KILL_SHAPE = (2048, 4096)  # float32: 32 MiB per step


@functools.lru_cache(maxsize=1)
def kill_base():
    return np.random.default_rng(0).standard_normal(KILL_SHAPE, dtype=np.float32)


def kill_state_numpy(step):
    return {"w": kill_base() + np.float32(step), "ids": np.arange(1000, dtype=np.int32) * step}


def kill_metadata(step):
    return {"step": step, "data_iterator": {"epoch": 0, "position": 7 * step}}


def kill_state(step):
    return {**jax.tree.map(jnp.asarray, kill_state_numpy(step)), "rng": jax.random.key(step)}


def writer_main(directory, first_step, num_steps):
    """Saves steps first_step, first_step+1, ... until killed (max_to_keep=2: pruning runs too)."""
    ckpt = Checkpointer(directory, max_to_keep=2)
    kill_base()
    print("ready", flush=True)
    for step in range(first_step, first_step + num_steps):
        ckpt.save(step, kill_state(step), kill_metadata(step))
        print(f"saved {step}", flush=True)


def verify_directory_after_kill(directory):
    """Every listed step restores bit-exactly; a new save then works and clears leftovers."""
    ckpt = Checkpointer(directory, max_to_keep=2)
    steps = ckpt.all_steps()
    assert steps, f"no committed step left in {directory}: {os.listdir(directory)}"
    device = SingleDeviceSharding(jax.devices()[0])
    target = {
        "w": jax.ShapeDtypeStruct(KILL_SHAPE, jnp.float32, sharding=device),
        "ids": jax.ShapeDtypeStruct((1000,), jnp.int32, sharding=device),
        "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=device),
    }
    for step in steps:
        restored, metadata = ckpt.restore(step, target=target)
        expected = kill_state_numpy(step)
        np.testing.assert_array_equal(np.asarray(restored["w"]), expected["w"])
        np.testing.assert_array_equal(np.asarray(restored["ids"]), expected["ids"])
        expected_key = jax.random.key_data(jax.random.key(step))
        np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), expected_key)
        assert metadata == kill_metadata(step)
    assert ckpt.latest_step() == steps[-1]
    leftovers = [n for n in os.listdir(directory) if not n.isdigit()]
    new_step = steps[-1] + 1  # usually the step whose save was killed: its temp dir is in the way
    assert ckpt.save(new_step, kill_state(new_step), kill_metadata(new_step))
    assert sorted(os.listdir(directory), key=int) == [str(s) for s in ckpt.all_steps()]
    assert ckpt.all_steps()[-1] == new_step
    restored, _ = ckpt.restore(target=target)
    np.testing.assert_array_equal(np.asarray(restored["ids"]), kill_state_numpy(new_step)["ids"])
    return steps, leftovers


def run_writer_and_kill(directory, trigger, delay_s=0.0):
    """Starts the writer, waits for `trigger` ('tmp', 'trash' or 'delay'), SIGKILLs it."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    log_path = (
        Path(directory).parent / "writer.log"
    )  # a file, so a full pipe never stalls the writer
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--writer", str(directory), "1", "60"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", (
            f"writer failed to start: {line!r} {log_path.read_text()[-3000:]}"
        )
        start = time.monotonic()
        seen = None
        while time.monotonic() - start < 60 and proc.poll() is None:
            names = os.listdir(directory)
            if trigger == "tmp":
                seen = next((n for n in names if ".orbax-checkpoint-tmp" in n), None)
            elif trigger == "trash":
                seen = ".deleted" if ".deleted" in names else None
            elif time.monotonic() - start >= delay_s:
                seen = f"after {delay_s:.3f}s"
            if seen:
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    stderr_tail = log_path.read_text()[-3000:]
    assert seen, f"trigger {trigger!r} never happened; writer rc={proc.returncode}: {stderr_tail}"
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"
    return seen


# One seeded random delay (seconds after the writer is ready) in each of three windows: before
# or during the first save, around the first commit and prune, a few saves in.
KILL_WINDOWS = [(0.1, 0.5), (0.5, 1.0), (1.0, 2.0)]
KILL_DELAYS = [
    round(random.Random(20261121 + i).uniform(lo, hi), 3) for i, (lo, hi) in enumerate(KILL_WINDOWS)
]


@pytest.mark.parametrize(
    "trigger, delay_s",
    [("tmp", 0.0), ("trash", 0.0)] + [("delay", d) for d in KILL_DELAYS],
)
def test_sigkill_during_save_never_leaves_a_bad_checkpoint(tmp_path, trigger, delay_s):
    directory = tmp_path / "ckpt"
    Checkpointer(directory).save(0, kill_state(0), kill_metadata(0))  # the previous complete step
    seen = run_writer_and_kill(directory, trigger, delay_s)
    leftovers_at_kill = sorted(n for n in os.listdir(directory) if not n.isdigit())
    steps, _ = verify_directory_after_kill(directory)
    print(f"trigger={trigger} ({seen}): committed steps {steps}, leftovers {leftovers_at_kill}")
    if trigger == "tmp":
        # Killed while the first new step was being written: that step must not be listed,
        # its temporary directory must still be there, and step 0 must be what restores.
        assert any(".orbax-checkpoint-tmp" in n for n in leftovers_at_kill), leftovers_at_kill
        assert steps == [0]
        assert Checkpointer(directory).restore_metadata(0) == kill_metadata(0)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--writer":
        writer_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python tests/test_checkpoint.py --writer DIR FIRST_STEP NUM_STEPS")
