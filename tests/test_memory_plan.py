"""The memory plan (``--config.mode=plan``): its figures for tiny models against a hand count, its
program list against the programs a tiny training step really compiles, its bad-input errors."""

import collections
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import dgpo_jax.launch.plan as plan_module
import dgpo_jax.launch.train as train_module
from dgpo_jax.config import ConfigError, base_config, validate
from dgpo_jax.launch.plan import (
    abstract_params,
    build_memory_plan,
    bytes_per_device,
    jaxpr_flops,
    parse_target,
    target_devices,
)
from dgpo_jax.learner.optim import OptimConfig, make_optimizer
from dgpo_jax.learner.update_step import (
    UpdateStep,
    abstract_update_state,
    create_update_state,
)
from dgpo_jax.models import get_preset, init_params
from dgpo_jax.objectives import get_objective
from dgpo_jax.parallel.sharding import plan_from_config
from tests.test_pipeline import tiny_config, world  # noqa: F401 (world is a fixture)

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
    a tiny student and teacher: parameters and optimizer state equal the hand count, the
    rollout's temporaries hold its KV cache, the peak is the resident state plus the largest
    program, and a too-small device fails naming the program and its bytes."""
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
        "--config.model.param_dtype=float32",
        f"--config.plan.fake_devices={devices}",
        "--config.plan.device_memory_gib=0.0001",
        f"--config.workdir={tmp_path}",
        f"--config.data.batch_size={rows}",
        "--config.train.mini_batch_size=8",
        "--config.train.micro_batch_size=4",
        "--config.train.pack=False",
        "--config.plan.programs=rollout,update",  # the others: the next test
        f"--config.sampler.cache_len={cache_len}",
        "--config.sampler.max_prompt_length=64",
        f"--config.sampler.ingest_chunk={chunk}",
    ]
    env = dict(os.environ, DGPO_JAX_COMPILATION_CACHE="")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0, "a plan above plan.device_memory_gib must fail"
    last = proc.stderr.strip().splitlines()[-1]
    assert "exceeds plan.device_memory_gib" in last, proc.stderr[-2000:]
    assert "memory plan per device" in proc.stdout
    plan = json.loads((tmp_path / "memory_plan.json").read_text())
    comp, programs = plan["components"], plan["programs"]
    assert plan["devices"] == devices and plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert plan["compiler"] == "XLA:CPU"
    assert list(programs) == ["rollout", "update (mini-batch)"]  # plan.programs
    worst = programs[plan["peak_program"]]
    assert f"memory plan: {worst['name']} ({worst['function']}) needs" in last

    student, teacher = get_preset("tiny"), get_preset("tiny-teacher")
    student_bytes = hand_param_bytes(student, devices)
    assert comp["student params"] == student_bytes
    assert comp["teacher params"] == hand_param_bytes(teacher, devices)
    # DGPO's separate critic: a copy of the student trunk + a value head (D weights + a bias).
    critic_bytes = student_bytes + (student.hidden_size + 1) * 4
    assert comp["critic params"] == critic_bytes
    # AdamW: two float32 moments per parameter, plus a few replicated counters (and the rng).
    extra = comp["optimizer state"] - 2 * (student_bytes + critic_bytes)
    assert 0 < extra <= 64, extra

    # The rollout program allocates the KV cache inside (k and v [L, B, K, S, Dh], the batch
    # over the 4 devices, S = cache_len; the valid mask [B, S] and two int32 [B] counters).
    s, b = cache_len, rows // devices
    hd = student.hidden_size // student.num_attention_heads
    kv = 2 * student.num_hidden_layers * b * student.num_key_value_heads * s * hd * 4
    assert programs["rollout"]["temporaries"] >= kv + b * s + 2 * b * 4
    # The update step's arguments beyond the resident state: the mini-batch after the
    # whole-batch pass, 9 per-token fields [8, 128] (ids, masks, behaviour and teacher log-probs,
    # advantages, gate, returns, values) and rewards [8], rows over the 4 devices. With them the
    # step needs no teacher forward: the compiled program keeps only the state and the batch.
    update = programs["update (mini-batch)"]
    batch_bytes = 9 * (8 // devices) * 128 * 4 + (8 // devices) * 4
    assert update["inputs"] == batch_bytes
    state_bytes = comp["student params"] + comp["critic params"] + comp["optimizer state"]
    assert update["arguments"] == state_bytes + batch_bytes
    assert update["aliased"] == state_bytes  # the donated state
    for p in programs.values():
        assert p["live"] == p["inputs"] + p["temporaries"] + p["outputs"] - p["aliased"]
        assert p["temporaries"] > 0
    assert plan["resident"] == sum(comp.values())
    assert plan["peak"] == plan["resident"] + max(p["live"] for p in programs.values())
    assert plan["peak"] == plan["resident"] + worst["live"]
    assert plan["fits"] is False


def test_plan_covers_every_program_one_step_compiles(world, tmp_path, monkeypatch):  # noqa: F811
    """A tiny one-step DGPO run (two mini-batches, so the whole-batch pass runs; an evaluation
    in the step) compiles exactly the programs the plan compiles, compared by the jitted
    functions' names (the rollout program twice: training and the greedy evaluation)."""
    cfg = tiny_config(world, tmp_path / "run", "dgpo")
    cfg.train.eval_every, cfg.eval.sampled = 1, False
    compiled, recording = [], [False]

    def listener(event, duration, **kw):
        if recording[0] and event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kw["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(listener)
    # The step's programs: everything compiled from the start of the training loop on (set-up
    # only initialises models and the optimizer state, eagerly). A program compiled ahead of
    # time at start-up (UpdateStep.compile) is the step's too.
    first_batch = train_module.PromptBatches.__next__

    def next_batch(self):
        recording[0] = True
        return first_batch(self)

    monkeypatch.setattr(train_module.PromptBatches, "__next__", next_batch)
    compile_ahead = getattr(UpdateStep, "compile", None)
    if compile_ahead is not None:

        def recorded_compile(self, *args, **kwargs):
            was, recording[0] = recording[0], True
            try:
                return compile_ahead(self, *args, **kwargs)
            finally:
                recording[0] = was

        monkeypatch.setattr(UpdateStep, "compile", recorded_compile)
    jax.clear_caches()  # programs compiled by earlier tests of this process compile again
    try:
        train_module.run_train(cfg)
    finally:
        recording[0] = False
        try:
            jax._src.monitoring.unregister_event_duration_listener(listener)
        except (AttributeError, AssertionError):
            pass
    ran = collections.Counter(name.removeprefix("jit(").removesuffix(")") for name in compiled)

    result = build_memory_plan(cfg)
    planned = collections.Counter(p.function for p in result.programs.values() if not p.same_as)
    # Packed mini-batches of different row counts compile one update program each: the names
    # must agree, and the rollouts (their configs differ) one by one.
    assert set(ran) == set(planned), (ran, planned)
    assert ran["rollout_program"] == planned["rollout_program"] == 2
    assert list(result.programs) == [
        "rollout",
        "score: behaviour log-probs",
        "prepare (whole batch)",
        "update (mini-batch)",
        "eval: greedy",
    ]
    # The peak is the resident state plus the largest program, each program's share counted
    # from its memory analysis.
    parts = [p.live for p in result.programs.values()]
    assert result.peak == result.resident + max(parts)
    assert result.resident == sum(result.components.values())


def test_jaxpr_flops_counts_loop_trips_and_the_costlier_branch():
    """Matmul FLOPs of a traced gradient, by hand: x [4, 8], w [8, 8]; a 5-step scan of
    c @ w, then a cond whose taken branch does one more c @ w (2 x 4 x 8 x 8 = 512 FLOPs per
    product). Forward: 5 x 512 + 512; backward of the cond branch: 2 x 512 (dw and dc); of
    the scan: 5 x 2 x 512. With jax.checkpoint the backward recomputes the scan (5 x 512)."""

    def f(x, w):
        c, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)
        return jax.lax.cond(c.sum() > 0, lambda: (c @ w).sum(), lambda: 0.0)

    x, w = jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((8, 8), jnp.float32)
    product = 2 * 4 * 8 * 8
    plain = jax.jit(jax.grad(f, argnums=1)).trace(x, w)
    assert jaxpr_flops(plain.jaxpr) == 5 * product + product + 2 * product + 5 * 2 * product
    remat = jax.jit(jax.grad(jax.checkpoint(f), argnums=1)).trace(x, w)
    assert jaxpr_flops(remat.jaxpr) == jaxpr_flops(plain.jaxpr) + 5 * product


def test_plan_rejects_bad_values():
    cfg = base_config()
    cfg.mode = "plan"
    cfg.model.student = "preset:tiny"
    cfg.plan.fake_devices = -2
    with pytest.raises(ConfigError, match="plan.fake_devices"):
        validate(cfg)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("prompt_width", -3, "plan.prompt_width: must be a number >= 0, got -3"),
        ("programs", "rollout,updates", r"plan.programs: unknown program group\(s\) \['updates'\]"),
    ],
)
def test_plan_knobs_are_checked_before_compiling(field, value, message):
    cfg = base_config()
    cfg.mode, cfg.model.student = "plan", "preset:tiny"
    cfg.plan[field] = value
    with pytest.raises(ConfigError, match=message):
        build_memory_plan(cfg)


@pytest.mark.parametrize(
    "text,topology",
    [
        ("tpu:v5e-16", "v5e:4x4"),
        ("tpu:v6e-8", "v6e:2x4"),
        ("tpu:v5p-16", "v5p:2x2x2"),  # v5p and v4 slice names count TensorCores, 2 per chip
        ("tpu:v4-32", "v4:2x2x4"),
        ("tpu:v5p-8", "v5p:2x2x1"),  # one host's 4 chips: a side of 1 last, as libtpu wants
        ("tpu:v4-8", "v4:2x2x1"),
        ("tpu:v5e:2x4", "v5e:2x4"),
    ],
)
def test_tpu_target_names(text, topology):
    target = parse_target(text)
    assert target.is_tpu and target.topology == topology
    assert not parse_target("").is_tpu


@pytest.mark.parametrize("text", ["tpu:v9-8", "gpu:h100", "tpu:v5e-12", "tpu:v5e"])
def test_unknown_tpu_target_lists_the_known_ones(text):
    with pytest.raises(ValueError, match=r"known: tpu:v4-N .* tpu:v5e-N .* tpu:v6e-N") as info:
        parse_target(text)
    assert "\n" not in str(info.value) and repr(text) in str(info.value)


@pytest.mark.parametrize(
    "text,topology",
    [("gpu:h100-8", "1x1x8"), ("gpu:h200-1", "1x1x1"), ("gpu:h100-16", "1x2x8")],
)
def test_gpu_target_names(text, topology):
    """N GPUs: up to 8 on one host, more in hosts of 8 (XLA:GPU's slices x hosts x GPUs)."""
    target = parse_target(text)
    assert target.is_gpu and not target.is_tpu and target.compile_only
    assert target.topology == topology


@pytest.mark.parametrize("text", ["gpu:a100-8", "gpu:h100-12", "gpu:h200-0"])
def test_unknown_gpu_target_lists_the_known_ones(text):
    with pytest.raises(ValueError, match=r"not a GPU target; known: .*gpu:h100-N / gpu:h200-N"):
        parse_target(text)


def test_gpu_target_without_the_cuda_plugin_names_the_extra(monkeypatch):
    monkeypatch.setattr(plan_module, "cuda_plugin_installed", lambda: False)
    with pytest.raises(ValueError, match=r"needs JAX's CUDA plugin .*\(pip install -e '\.\[gpu\]'"):
        target_devices(parse_target("gpu:h100-8"))


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is not None,
    reason="libtpu is installed: tests/test_plan_tpu.py compiles for TPU targets",
)
def test_tpu_target_without_libtpu_names_the_extra():
    with pytest.raises(ValueError, match=r"install the tpu extra \(pip install -e '\.\[tpu\]'\)"):
        target_devices(parse_target("tpu:v5e-16"))


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
