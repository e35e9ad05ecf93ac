"""The memory plan (``--config.mode=plan``): its figures for tiny models against a hand count."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dgpo_jax.config import ConfigError, base_config, validate
from dgpo_jax.launch.plan import abstract_params, bytes_per_device
from dgpo_jax.learner.optim import OptimConfig, make_optimizer
from dgpo_jax.learner.update_step import abstract_update_state, create_update_state
from dgpo_jax.models import get_preset, init_params
from dgpo_jax.objectives import get_objective
from dgpo_jax.parallel.sharding import plan_from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bytes_per_device_counts_one_shard():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    tree = {
        "split": jax.ShapeDtypeStruct(
            (64, 32), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("b", None))
        ),
        "both": jax.ShapeDtypeStruct(
            (8, 12), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("a", "b"))
        ),
        "replicated": jax.ShapeDtypeStruct(
            (10,), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())
        ),
        "plain": jax.ShapeDtypeStruct((3, 5), jnp.float32),
    }
    assert bytes_per_device(tree) == 64 * 32 * 4 // 4 + (8 // 2) * (12 // 4) * 2 + 10 * 4 + 60


def hand_param_bytes(c, fsdp: int, itemsize: int = 4) -> int:
    """Per-device parameter bytes of a Qwen2 config, counted by hand: every matrix has one
    ``hidden_size`` dimension, split over the fsdp axis; biases and norms are replicated."""
    d, f, hd = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
    h, k, v = c.num_attention_heads, c.num_key_value_heads, c.vocab_size
    matrices = v * d * (1 if c.tie_word_embeddings else 2)
    matrices += c.num_hidden_layers * (d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f)
    vectors = c.num_hidden_layers * (h * hd + 2 * k * hd + 2 * d) + d
    return (matrices // fsdp + vectors) * itemsize


def test_plan_cli_tiny_dgpo_against_hand_count(tmp_path):
    """The launcher's plan mode on 4 fake devices (the test session's 8 are replaced), DGPO with
    a tiny student and teacher: parameters, optimizer state and KV cache equal the hand count;
    the compiled programs' temporaries are positive; a too-small device fails the plan."""
    rows, cache_len, chunk, devices = 16, 128, 16, 4
    cmd = [
        sys.executable,
        "-m",
        "dgpo_jax.launch",
        "--config=configs/dgpo_nq.py",
        "--config.mode=plan",
        "--config.model.student=preset:tiny",
        "--config.model.teacher=preset:tiny-teacher",
        "--config.model.dtype=float32",
        f"--config.plan.fake_devices={devices}",
        "--config.plan.device_memory_gib=0.0001",
        f"--config.workdir={tmp_path}",
        f"--config.data.batch_size={rows}",
        "--config.train.mini_batch_size=8",
        "--config.train.micro_batch_size=4",
        f"--config.sampler.cache_len={cache_len}",
        f"--config.sampler.ingest_chunk={chunk}",
    ]
    env = dict(os.environ, DGPO_JAX_COMPILATION_CACHE="")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0, "a plan above plan.device_memory_gib must fail"
    assert "exceeds plan.device_memory_gib" in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert "memory plan per device" in proc.stdout
    plan = json.loads((tmp_path / "memory_plan.json").read_text())
    comp = plan["components"]
    assert plan["devices"] == devices and plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}

    student, teacher = get_preset("tiny"), get_preset("tiny-teacher")
    student_bytes = hand_param_bytes(student, devices)
    assert comp["student params"] == student_bytes
    assert comp["teacher params"] == hand_param_bytes(teacher, devices)
    # DGPO's separate critic: a copy of the student trunk + a value head (D weights + a bias).
    critic_bytes = student_bytes + (student.hidden_size + 1) * 4
    assert comp["critic params"] == critic_bytes
    # AdamW: two float32 moments per parameter, plus a few replicated int32 counters.
    extra = comp["optimizer state"] - 2 * (student_bytes + critic_bytes)
    assert 0 < extra <= 64, extra
    # KV cache: k and v [L, B, K, S, Dh] with the batch over the 4 devices, S = cache_len; plus
    # the valid mask [B, S] bool and two int32 [B] counters.
    s, b = cache_len, rows // devices
    hd = student.hidden_size // student.num_attention_heads
    kv = 2 * student.num_hidden_layers * b * student.num_key_value_heads * s * hd * 4
    assert comp["kv cache"] == kv + b * s + 2 * b * 4
    assert comp["update activations"] > 0 and comp["rollout step"] > 0
    resident = sum(
        comp[k] for k in ("student params", "teacher params", "critic params", "optimizer state")
    )
    assert plan["resident"] == resident
    assert plan["peak"] == resident + max(
        comp["update activations"], comp["kv cache"] + comp["rollout step"]
    )
    assert plan["fits"] is False


def test_plan_rejects_bad_values():
    cfg = base_config()
    cfg.mode = "plan"
    cfg.model.student = "preset:tiny"
    cfg.plan.fake_devices = -2
    with pytest.raises(ConfigError, match="plan.fake_devices"):
        validate(cfg)


@pytest.mark.parametrize(
    "preset,overrides", [("dgpo", {}), ("ppo", {"critic": "value_head"}), ("opd", {})]
)
def test_abstract_update_state_matches_the_real_one(preset, overrides):
    """What the plan compiles against is what training builds: same tree, shapes, dtypes and
    shardings as ``create_update_state`` on real parameters."""

    config = get_preset("tiny")
    plan = plan_from_config({"data": 2, "fsdp": 4})
    objective, tx = get_objective(preset, **overrides), make_optimizer(OptimConfig())
    real = create_update_state(
        objective, plan.shard_params(config, init_params(config, jax.random.key(0))), tx, 0
    )
    abstract = abstract_update_state(objective, abstract_params(config, "float32", plan), tx)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert (a.shape, a.dtype) == (r.shape, r.dtype)
        assert a.sharding.is_equivalent_to(r.sharding, len(a.shape)), (a.sharding, r.sharding)
    assert bytes_per_device(abstract) == bytes_per_device(real)
